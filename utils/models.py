"""One registry of classifiers (name -> constructor), with BackdoorBench's state_dict key names.

`preactresnet18` is BackdoorBench's own network; `airbench_cpu` is a small airbench-style network for training on
a CPU in minutes; every other name is the torchvision model of that name with `num_classes` set (vit models
wrapped as `Sequential(Resize(224), vit)`, as BackdoorBench does).
"""
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.errors import UserError
from utils.registry import Registry

MODELS = Registry("model")  # name -> constructor(num_classes, img_size)


def register_model(name):
    def decorate(constructor):
        return MODELS.add(name, constructor)
    return decorate


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """BackdoorBench's PreAct-ResNet18: no BN after the stem, none after layer4, head named `linear`.

    `width` (channels of layer1; BackdoorBench: 64, doubled at each stage) and `blocks` (PreActBlocks per stage;
    BackdoorBench: 2) give the narrower and shallower members of the family that the CPU proxy uses; the module
    names, and so the state_dict keys and what each defense sees, are the same for every member.
    """

    def __init__(self, num_classes=10, in_channels=3, width=64, blocks=2):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
        in_planes = width
        for index, stride in enumerate((1, 2, 2, 2), start=1):
            planes = width * 2 ** (index - 1)
            stage = [PreActBlock(in_planes, planes, stride)] + [PreActBlock(planes, planes, 1) for _ in range(blocks - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*stage))
            in_planes = planes
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(self.avgpool(out), 1))


@register_model("preactresnet18")
def preactresnet18(num_classes, img_size):
    return PreActResNet18(num_classes=num_classes, in_channels=img_size[2])


def _preact_member(width, blocks):
    def build(num_classes, img_size):
        return PreActResNet18(num_classes=num_classes, in_channels=img_size[2], width=width, blocks=blocks)
    return build


# the PreAct family's CPU-proxy candidates (docs/results.md: how the proxy was chosen): preactresnet<depth>_w<width>,
# depth 18 = 2 blocks per stage, 10 = 1
for _width in (16, 24, 32):
    for _depth, _blocks in ((18, 2), (10, 1)):
        register_model(f"preactresnet{_depth}_w{_width}")(_preact_member(_width, _blocks))


def _grey_to_rgb(module, args):
    return (args[0].expand(-1, 3, -1, -1),) + args[1:]


class ConvGroup(nn.Module):
    """airbench's block: conv -> 2x2 max-pool -> BN -> GELU -> conv -> BN -> GELU (pooling before the BN halves
    the cost of everything after the first conv)."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.activation = nn.GELU()

    def forward(self, x):
        x = self.activation(self.bn1(self.pool(self.conv1(x))))
        return self.activation(self.bn2(self.conv2(x)))


class AirbenchCPU(nn.Module):
    """airbench94's layout (Keller Jordan, 2024) at a width a 2-core CPU can train: a 2x2 stem conv (no padding,
    32 -> 31), three ConvGroups (31 -> 15 -> 7 -> 3), global max-pool, a linear head named `linear`.

    Default widths 16 (stem) / 32 / 64 / 128 (airbench94: 24 / 64 / 256 / 256): 7 conv layers + linear,
    292,698 parameters, 17.6 M multiply-adds (35 MFLOPs) per 32x32 image, 1/32 of PreAct-ResNet18's 0.56 G.
    Why this shape: every conv but the first group's runs at 15x15 or less, so the cost goes into channels; BN
    after each conv makes lr 0.2 with a one-cycle schedule stable. On 2 EPYC cores with bfloat16 autocast it trains
    at ~2,300 img/s (22 s per CIFAR-10 epoch, against ~100 img/s for PreAct-ResNet18): 18 epochs give clean ACC
    0.85 (config/attack/prototype/cifar10_cpu.yaml). Widths 24/48/96/192 (0.66 M parameters) ran at ~1,150 img/s
    and reached the same ACC in 10 epochs but a lower BadNets ASR (0.92 against 0.95).
    Left out of airbench: the frozen whitening stem, lookahead, flip test-time augmentation and the logit scale.
    """

    def __init__(self, num_classes=10, widths=(16, 32, 64, 128)):
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], kernel_size=2, bias=True)
        self.activation = nn.GELU()
        self.layers = nn.Sequential(*(ConvGroup(a, b) for a, b in zip(widths[:-1], widths[1:])))
        self.pool = nn.AdaptiveMaxPool2d((1, 1))
        self.linear = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        out = self.layers(self.activation(self.stem(x)))
        return self.linear(torch.flatten(self.pool(out), 1))


@register_model("airbench_cpu")
def airbench_cpu(num_classes, img_size):
    model = AirbenchCPU(num_classes=num_classes)
    if img_size[2] == 1:
        model.register_forward_pre_hook(_grey_to_rgb)  # RGB stem: same keys and shapes for grey input
    return model


def _torchvision(name):
    def build(num_classes, img_size):
        import torchvision.models as tvm
        model = getattr(tvm, name)(weights=None, num_classes=num_classes)
        if img_size[2] == 1:
            # torchvision stems take RGB: repeat a grey channel (a hook, so state_dict keys stay the same)
            model.register_forward_pre_hook(_grey_to_rgb)
        return model
    return build


for _name in ("resnet18", "resnet34", "resnet50", "vgg11", "vgg16", "vgg19", "vgg19_bn", "densenet121",
              "densenet161", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
              "efficientnet_b3", "convnext_tiny", "regnet_y_400mf"):
    register_model(_name)(_torchvision(_name))


def _vit(name):
    def build(num_classes, img_size):
        import torchvision.models as tvm
        import torchvision.transforms as T
        vit = getattr(tvm, name)(weights=None, num_classes=num_classes)
        model = nn.Sequential(T.Resize(224, antialias=True), vit)
        if img_size[2] == 1:
            # a hook, not an extra stage, so the keys stay `1.*` and the head `1.heads.head`
            model.register_forward_pre_hook(_grey_to_rgb)
        return model
    return build


for _name in ("vit_b_16",):
    register_model(_name)(_vit(_name))


def build_model(name, num_classes, img_size=(32, 32, 3)):
    return MODELS.lookup(name)(num_classes, tuple(img_size))


def strip_module_prefix(state_dict):
    """Keys of a DataParallel-trained state_dict without their `module.` prefix."""
    return OrderedDict((key[len("module."):] if key.startswith("module.") else key, value)
                       for key, value in state_dict.items())


def load_weights(model, state_dict, what="the record"):
    """Load strictly; a mismatch says which keys differ instead of torch's long traceback."""
    state_dict = strip_module_prefix(state_dict)
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    not_tensors = [key for key, value in state_dict.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise UserError(f"the weights in {what} are not all tensors (e.g. {', '.join(map(str, not_tensors[:3]))})")
    wrong_shape = [key for key in expected if key in state_dict and tuple(state_dict[key].shape) != tuple(expected[key].shape)]
    # load_state_dict would cast silently: int, bool or half weights are a damaged or foreign file, not this model
    wrong_type = [f"{key} ({state_dict[key].dtype}, expected {expected[key].dtype})" for key in expected
                  if key in state_dict and state_dict[key].dtype != expected[key].dtype]
    if missing or unexpected or wrong_shape or wrong_type:
        details = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape),
                            ("wrong type", wrong_type)):
            if keys:
                details.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise UserError(f"the weights in {what} do not fit this model: " + "; ".join(details))
    model.load_state_dict(state_dict, strict=True)
    return model


def classifier_head(model, num_classes, name=None):
    """(qualified name, module) of the final Linear layer: `name` if given, else the last Linear with
    `num_classes` outputs in module order (linear, fc, classifier.6, 1.heads.head, ...)."""
    modules = dict(model.named_modules())
    if name:
        if not isinstance(modules.get(name), nn.Linear):
            linears = [key for key, module in modules.items() if isinstance(module, nn.Linear)]
            raise UserError(f"no Linear layer named {name!r} in this model; its Linear layers: {', '.join(linears)}")
        return name, modules[name]
    heads = [(key, module) for key, module in modules.items()
             if isinstance(module, nn.Linear) and module.out_features == num_classes]
    if not heads:
        raise UserError(f"no Linear layer with {num_classes} outputs found in this model: cannot locate its head")
    return heads[-1]


def cpu_state_dict(model):
    """A contiguous CPU copy of the state_dict, as BackdoorBench saves it."""
    return OrderedDict((key, value.detach().to("cpu").contiguous().clone()) for key, value in model.state_dict().items())
