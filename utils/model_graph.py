"""What a defense needs to know about a model's graph that its module list does not say, found by hooks on one
forward pass: which conv feeds which BatchNorm (CLP), which channels enter the global pooling and which Linear reads
them (FP), and each of those channels' mean activation on clean data."""
from dataclasses import dataclass

import torch
import torch.nn as nn

from utils.errors import UserError
from utils.training import eval_mode

GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
# Modules that act on each channel separately and keep the channel count: a BatchNorm after them still normalises
# the conv's channels.
CHANNELWISE = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d, nn.Identity, nn.Dropout,
               nn.Dropout2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish)


def module_order_pairs(model):
    """Each BatchNorm2d with the last Conv2d before it in named_modules order (the authors' and BackdoorBench's)."""
    pairs, last_conv = [], None
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            last_conv = name
        elif isinstance(module, nn.BatchNorm2d) and last_conv is not None:
            pairs.append((last_conv, name))
    return pairs


def traced_pairs(model, img_size):
    """Conv -> BatchNorm2d pairs by data flow: forward one blank image (eval mode, running statistics untouched)
    and pair a BatchNorm2d with the conv whose output tensor reaches it, directly or through CHANNELWISE modules."""
    source = {}  # id(tensor) -> name of the conv that produced it
    alive = []  # keep every tracked tensor referenced so that no id is reused during the pass
    found = {}  # BatchNorm name -> set of conv names seen feeding it

    def conv_output(name):
        def hook(_module, _inputs, output):
            source[id(output)] = name
            alive.append(output)
        return hook

    def passed_through(_module, inputs, output):
        conv = source.get(id(inputs[0])) if inputs and torch.is_tensor(inputs[0]) else None
        if conv is not None and torch.is_tensor(output) and output.shape[1] == inputs[0].shape[1]:
            source[id(output)] = conv
            alive.append(output)

    def bn_input(name):
        def hook(_module, inputs):
            found.setdefault(name, set()).add(source.get(id(inputs[0])))
        return hook

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_output(name)))
        elif isinstance(module, nn.BatchNorm2d):
            handles.append(module.register_forward_pre_hook(bn_input(name)))
        elif isinstance(module, CHANNELWISE):
            handles.append(module.register_forward_hook(passed_through))
    parameter = next(model.parameters())
    height, width, channels = img_size
    try:
        with torch.no_grad(), eval_mode(model, handles):
            model(torch.zeros(1, channels, height, width, dtype=parameter.dtype, device=parameter.device))
    except RuntimeError as err:
        raise UserError(f"could not trace this model with one {height}x{width} image ({err}); "
                        "--pairing module_order pairs by module order instead") from None
    # a BatchNorm reached once, from one conv (one that is also fed by a sum or by two convs is left out)
    return [(next(iter(convs)), bn) for bn, convs in found.items() if len(convs) == 1 and None not in convs]


@dataclass
class PrunableChannels:
    """Where FP prunes: the channels entering `pool`, removed as columns of `linear`."""
    pool_name: str
    pool: nn.Module
    linear_name: str
    linear: nn.Linear
    channels: int


def global_pool(model, name=None):
    """(name, module) of the pooling layer: `name`, or the last global pooling with a 1x1 output."""
    modules = dict(model.named_modules())
    if name:
        if name not in modules:
            raise UserError(f"FP: no module named {name!r} in this model ({type(model).__name__}); --pool_name takes "
                            "the qualified name of its global pooling layer")
        return name, modules[name]
    pools = [(key, module) for key, module in modules.items() if isinstance(module, GLOBAL_POOLS)
             and module.output_size in (1, (1, 1))]
    if not pools:
        raise UserError(f"FP prunes the channels entering a global pooling layer, but this model "
                        f"({type(model).__name__}) has no AdaptiveAvgPool2d/AdaptiveMaxPool2d with a 1x1 output; "
                        "name one with --pool_name")
    return pools[-1]


@torch.no_grad()
def find_prunable_channels(model, x, pool_name=None):
    """The pooling layer, its channel count and the first Linear called after it that reads that many features,
    found by one eval-mode forward pass of the batch `x`; one UserError if FP cannot prune this model."""
    name, pool = global_pool(model, pool_name)
    seen = {"channels": None, "linear": None}

    def at_pool(_module, inputs):
        if seen["channels"] is None and torch.is_tensor(inputs[0]) and inputs[0].dim() == 4:
            seen["channels"] = inputs[0].shape[1]

    def at_linear(linear_name):
        def hook(module, _inputs, _output):
            if seen["linear"] is None and seen["channels"] == module.in_features:
                seen["linear"] = linear_name
        return hook

    modules = dict(model.named_modules())
    handles = [pool.register_forward_pre_hook(at_pool)]
    handles += [module.register_forward_hook(at_linear(key)) for key, module in modules.items()
                if isinstance(module, nn.Linear)]
    with eval_mode(model, handles):
        model(x)
    if seen["channels"] is None:
        raise UserError(f"FP: {name} does not receive a feature map (N, C, H, W) in this model: nothing to prune")
    if seen["linear"] is None:
        raise UserError(f"FP: no Linear layer reads the {seen['channels']} pooled channels of {name} in this model: "
                        "cannot prune them")
    target = PrunableChannels(name, pool, seen["linear"], modules[seen["linear"]], seen["channels"])
    check_columns_remove_channels(model, target, x)
    return target


@torch.no_grad()
def check_columns_remove_channels(model, target, x):
    """Zeroing Linear columns must equal zeroing the channels before the pooling (true when only flatten, dropout or
    other per-feature reshaping lies between them); checked on `x` with every other channel removed."""
    removed = torch.arange(target.channels, device=x.device) % 2 == 0
    keep = (~removed).float().view(1, -1, 1, 1)
    handle = target.pool.register_forward_pre_hook(lambda _m, inputs: (inputs[0] * keep.to(inputs[0].dtype),))
    with eval_mode(model, [handle]):
        by_channels = model(x).float()
    original = target.linear.weight.detach().clone()
    target.linear.weight[:, removed] = 0
    with eval_mode(model):
        by_columns = model(x).float()
    target.linear.weight.copy_(original)
    scale = float(by_channels.abs().max()) + 1e-6
    if not torch.allclose(by_columns, by_channels, rtol=1e-3, atol=1e-4 * scale):
        raise UserError(f"FP: zeroing columns of {target.linear_name} does not remove the channels entering "
                        f"{target.pool_name} in this model (a layer between them mixes channels): cannot prune it")


@torch.inference_mode()
def mean_channel_activation(model, pool, data, batch_size):
    """Each channel's activation entering `pool`, averaged over the images and positions of `data` (eval mode)."""
    total, count = None, 0

    def record(_module, inputs):
        nonlocal total
        sums = inputs[0].float().mean(dim=(2, 3)).sum(dim=0)
        total = sums if total is None else total + sums

    with eval_mode(model, [pool.register_forward_pre_hook(record)]):
        for x, _ in data.batches(batch_size):
            model(x)
            count += len(x)
    return (total / count).cpu()
