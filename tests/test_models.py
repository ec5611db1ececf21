"""utils/models.py: every registered model builds with BackdoorBench's key names and head, runs a forward pass,
and loads a real BackdoorBench record's weights strictly."""
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from utils.errors import UserError
from utils.models import (MODELS, build_model, classifier_head, cpu_state_dict, load_weights,
                          strip_module_prefix)

# the head each known model must report (a new registry entry without one here still gets the generic checks)
EXPECTED_HEADS = {
    "preactresnet18": "linear", "airbench_cpu": "linear",
    "resnet18": "fc", "resnet34": "fc", "resnet50": "fc", "regnet_y_400mf": "fc",
    "vgg11": "classifier.6", "vgg16": "classifier.6", "vgg19": "classifier.6", "vgg19_bn": "classifier.6",
    "densenet121": "classifier", "densenet161": "classifier",
    "mobilenet_v2": "classifier.1", "mobilenet_v3_small": "classifier.3", "mobilenet_v3_large": "classifier.3",
    "efficientnet_b0": "classifier.1", "efficientnet_b3": "classifier.1",
    "convnext_tiny": "classifier.2",
    "vit_b_16": "1.heads.head",
}
RECORD = Path(__file__).resolve().parents[2] / "shared" / "records" / "badnet_0_1" / "attack_result.pt"


@pytest.fixture(scope="module")
def record():
    from utils.safe_pickle import safe_torch_load
    from conftest import require_shared_record
    require_shared_record(RECORD.parent.name)
    return safe_torch_load(RECORD)


@pytest.fixture(scope="module")
def record_state(record):
    return record["model"]


_BUILT = {}
_REUSED = {"vgg19_bn", "vit_b_16", "mobilenet_v3_large"}


def built(name):
    """One 10-class model per name for the whole file (building VGG/ConvNeXt/ViT takes seconds on CPU); the tests
    that use it never change it."""
    if name in _BUILT:
        return _BUILT[name]
    torch.manual_seed(0)
    model = build_model(name, 10, [32, 32, 3]).eval()  # img_size as a list (YAML gives lists) works
    if name in _REUSED:  # keep only those other tests reuse: all of them together take gigabytes
        _BUILT[name] = model
    return model


def _fresh_preact():
    torch.manual_seed(0)
    return build_model("preactresnet18", 10, (32, 32, 3))


# ---------------------------------------------------------------- the registry

def test_registry_holds_backdoorbench_models():
    assert {"preactresnet18", "resnet18", "vgg19_bn", "vit_b_16", "mobilenet_v3_large", "efficientnet_b3",
            "densenet161"} <= set(MODELS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_builds_finds_its_head_and_runs_forward(name):
    model = built(name)
    assert isinstance(model, nn.Module)
    head_name, head = classifier_head(model, 10)
    assert isinstance(head, nn.Linear) and head.out_features == 10
    assert dict(model.named_modules())[head_name] is head
    if name in EXPECTED_HEADS:
        assert head_name == EXPECTED_HEADS[name]
    # the head is the module the state_dict names: its weight is under "<head>.weight"
    assert model.state_dict()[f"{head_name}.weight"].shape == (10, head.in_features)
    assert classifier_head(model, 10, name=head_name) == (head_name, head)
    with torch.no_grad():  # vit_b_16 resizes to 224: slow on CPU, but two images are fine
        out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_other_class_counts_change_only_the_head():
    for num_classes, img_size in ((43, (32, 32, 3)), (200, (64, 64, 3))):
        model = build_model("preactresnet18", num_classes, img_size).eval()
        name, head = classifier_head(model, num_classes)
        assert name == "linear" and head.out_features == num_classes and head.in_features == 512
        with torch.no_grad():
            assert model(torch.rand(2, 3, img_size[0], img_size[1])).shape == (2, num_classes)


def test_vgg19_bn_keeps_torchvision_layout_on_32x32():
    model = built("vgg19_bn")
    first = model.classifier[0]
    assert isinstance(first, nn.Linear) and (first.in_features, first.out_features) == (25088, 4096)
    assert classifier_head(model, 10)[0] == "classifier.6"


def test_head_is_the_last_linear_when_several_have_num_classes_outputs():
    # mobilenet_v3_large: classifier.0 is Linear(960, 1280); with 1280 classes the head is still classifier.3
    model = build_model("mobilenet_v3_large", 1280)
    assert model.classifier[0].out_features == 1280
    assert classifier_head(model, 1280)[0] == "classifier.3"


def test_vit_is_wrapped_with_a_resize_so_keys_start_with_1():
    model = built("vit_b_16")
    assert isinstance(model, nn.Sequential)
    keys = list(model.state_dict())
    assert keys and all(key.startswith("1.") for key in keys)
    assert "1.heads.head.weight" in keys


def test_unknown_model_is_a_user_error_listing_the_registry():
    with pytest.raises(UserError) as err:
        build_model("resnet9000", 10)
    assert "resnet9000" in str(err.value) and "preactresnet18" in str(err.value) and "vgg19_bn" in str(err.value)


# ---------------------------------------------------------------- BackdoorBench's PreAct-ResNet18

def test_preactresnet18_state_dict_matches_the_backdoorbench_record(record, record_state):
    model = _fresh_preact()
    ours = model.state_dict()
    assert len(ours) == 102
    assert record["model_name"] == "preactresnet18" and record["num_classes"] == 10
    theirs = strip_module_prefix(record_state)
    assert list(ours) == list(theirs)  # same names, same order
    for key in ours:
        assert tuple(ours[key].shape) == tuple(theirs[key].shape), key
        assert ours[key].dtype == theirs[key].dtype, key
    # the layout the spec describes
    assert ours["conv1.weight"].shape == (64, 3, 3, 3)
    assert {k for k in ours if "shortcut" in k} == {f"layer{i}.0.shortcut.0.weight" for i in (2, 3, 4)}
    assert not any(k.startswith("bn") for k in ours)  # no BN after the stem or after layer4
    assert ours["linear.weight"].shape == (10, 512)


def test_load_weights_accepts_the_record_and_copies_it(record_state):
    model = _fresh_preact()
    assert load_weights(model, record_state, "badnet_0_1") is model
    loaded = model.state_dict()
    for key, value in strip_module_prefix(record_state).items():
        assert torch.equal(loaded[key], value), key


def test_record_weights_classify_real_cifar10(record_state, cifar10_dir):
    """Same key names are not enough: the forward pass must be BackdoorBench's. The record's model scores 0.5356
    on the CIFAR-10 test set; a wrong block (BN after the stem, shortcut from x instead of relu(bn1(x))) scores
    near chance."""
    from utils.datasets import CleanSplit, dataset_info
    test = CleanSplit("cifar10", cifar10_dir.parent, train=False)
    info = dataset_info("cifar10")
    indices = np.arange(0, 10000, 40)  # 250 images
    x = torch.from_numpy(test.images(indices)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(info.mean).view(1, 3, 1, 1)) / torch.tensor(info.std).view(1, 3, 1, 1)
    model = load_weights(_fresh_preact(), record_state).eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(1).numpy() == test.labels[indices]).mean()
    assert 0.42 < accuracy < 0.66, accuracy


def test_module_prefixed_keys_load(record_state):
    prefixed = OrderedDict((f"module.{key}", value) for key, value in strip_module_prefix(record_state).items())
    model = load_weights(_fresh_preact(), prefixed, "a DataParallel checkpoint")
    assert torch.equal(model.linear.weight, strip_module_prefix(record_state)["linear.weight"])


def test_strip_module_prefix_only_strips_a_leading_prefix():
    state = OrderedDict([("module.a.weight", 1), ("b.module.c", 2), ("module.module.d", 3), ("modules.e", 4)])
    assert list(strip_module_prefix(state).items()) == [("a.weight", 1), ("b.module.c", 2), ("module.d", 3),
                                                        ("modules.e", 4)]


def _assert_unchanged(model, before):
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed by a failed load"


@pytest.mark.parametrize("damage, key, word", [
    ("drop", "layer3.1.bn2.running_var", "missing"),
    ("drop", "linear.bias", "missing"),
    ("reshape", "layer2.0.shortcut.0.weight", "wrong shape"),
    ("reshape", "conv1.weight", "wrong shape"),
    ("extra", "layer4.1.bn3.weight", "unexpected"),
])
def test_mismatched_state_dict_is_a_user_error_naming_the_key(record_state, damage, key, word):
    state = OrderedDict(strip_module_prefix(record_state))
    if damage == "drop":
        del state[key]
    elif damage == "reshape":
        state[key] = torch.zeros(3, *state[key].shape[1:])
    else:
        state[key] = torch.zeros(512)
    model = _fresh_preact()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError) as err:
        load_weights(model, state, "the record badnet_0_1")
    message = str(err.value)
    assert key in message and word in message and "badnet_0_1" in message
    _assert_unchanged(model, before)  # nothing half-loaded


def test_record_for_another_class_count_is_a_user_error(record_state):
    model = build_model("preactresnet18", 43, (32, 32, 3))
    with pytest.raises(UserError) as err:
        load_weights(model, record_state)
    assert "linear.weight" in str(err.value) and "linear.bias" in str(err.value)


def test_another_architecture_is_a_user_error(record_state):
    with pytest.raises(UserError) as err:
        load_weights(build_model("resnet18", 10), record_state, "badnet_0_1")
    assert "missing" in str(err.value) and "unexpected" in str(err.value)


# ---------------------------------------------------------------- grey (mnist) input

def test_preactresnet18_takes_one_channel():
    model = build_model("preactresnet18", 10, (28, 28, 1)).eval()
    assert model.state_dict()["conv1.weight"].shape == (64, 1, 3, 3)
    with torch.no_grad():
        assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def _skeleton(name, channels):
    """The model without paying for weight initialisation (meta tensors) where its constructor allows that."""
    try:
        with torch.device("meta"):
            return build_model(name, 10, (28, 28, channels))
    except NotImplementedError:  # regnet computes its widths with real tensor ops
        return build_model(name, 10, (28, 28, channels))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_one_channel_models_keep_the_rgb_key_names_and_head(name):
    grey, rgb = _skeleton(name, 1), _skeleton(name, 3)
    grey_shapes = {k: tuple(v.shape) for k, v in grey.state_dict().items()}
    rgb_shapes = {k: tuple(v.shape) for k, v in rgb.state_dict().items()}
    assert list(grey_shapes) == list(rgb_shapes)
    differing = {k for k in grey_shapes if grey_shapes[k] != rgb_shapes[k]}
    assert differing == ({"conv1.weight"} if name.startswith("preactresnet") else set())
    assert classifier_head(grey, 10)[0] == classifier_head(rgb, 10)[0]
    if name in EXPECTED_HEADS:
        assert classifier_head(grey, 10)[0] == EXPECTED_HEADS[name]


def test_vit_takes_one_channel():
    model = build_model("vit_b_16", 10, (28, 28, 1)).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, 28, 28)).shape == (1, 10)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_model_takes_one_channel_with_unchanged_keys(name):
    torch.manual_seed(0)
    grey = build_model(name, 10, (28, 28, 1)).eval()
    rgb = build_model(name, 10, (28, 28, 3)).eval()
    assert {k: v.shape for k, v in grey.state_dict().items()} == {k: v.shape for k, v in rgb.state_dict().items()}
    rgb.load_state_dict(grey.state_dict())
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        out = grey(x)
        assert out.shape == (2, 10)
        # the grey channel is repeated: same as the RGB model on three copies of it
        torch.testing.assert_close(out, rgb(x.repeat(1, 3, 1, 1)))


# ---------------------------------------------------------------- classifier_head by name, cpu_state_dict

def test_classifier_head_by_unknown_name_lists_the_linear_layers():
    with pytest.raises(UserError) as err:
        classifier_head(built("mobilenet_v3_large"), 10, name="nonexistent")
    message = str(err.value)
    assert "nonexistent" in message and "classifier.0" in message and "classifier.3" in message
    with pytest.raises(UserError) as err:
        classifier_head(_fresh_preact(), 10, name="nonexistent")
    assert "linear" in str(err.value)


def test_classifier_head_by_name_must_be_linear():
    model = _fresh_preact()
    with pytest.raises(UserError) as err:
        classifier_head(model, 10, name="conv1")
    assert "conv1" in str(err.value) and "linear" in str(err.value)
    assert classifier_head(model, 10, name="linear") == ("linear", model.linear)


def test_classifier_head_without_a_matching_linear_is_a_user_error():
    with pytest.raises(UserError) as err:
        classifier_head(_fresh_preact(), 7)
    assert "7" in str(err.value)


def test_cpu_state_dict_is_a_detached_contiguous_copy():
    model = _fresh_preact().to(memory_format=torch.channels_last)
    assert not model.conv1.weight.is_contiguous()
    state = cpu_state_dict(model)
    assert list(state) == list(model.state_dict())
    for key, value in state.items():
        assert value.device.type == "cpu" and value.is_contiguous() and not value.requires_grad, key
        assert torch.equal(value, model.state_dict()[key]), key
    state["linear.weight"].zero_()
    assert model.linear.weight.abs().sum() > 0  # a copy, not a view of the model
    # it round-trips through load_weights and torch.save/load with weights_only
    import io
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    reloaded = torch.load(buffer, weights_only=True)
    fresh = load_weights(build_model("preactresnet18", 10), reloaded)
    assert torch.equal(fresh.conv1.weight, state["conv1.weight"])



@pytest.mark.parametrize("name", sorted(name for name in MODELS if name.startswith("preactresnet")))
def test_the_preact_family_keeps_backdoorbench_module_names(name):
    """The proxy's candidates differ from PreAct-ResNet18 in width and depth only: every key of the narrower or
    shallower model is one of PreAct-ResNet18's (same structure, BatchNorms and head), so defenses see the same."""
    full = build_model("preactresnet18", 10).state_dict()
    member = build_model(name, 10).state_dict()
    assert set(member) <= set(full) and {k for k in full if k.startswith("layer1.0")} <= set(member)
    assert sum(v.numel() for k, v in full.items() if "running" not in k and "num_batches" not in k) == 11_171_146
    width = member["conv1.weight"].shape[0]
    assert member["linear.weight"].shape == (10, 8 * width)
    blocks = 2 if name.startswith("preactresnet18") else 1
    assert (f"layer4.{blocks - 1}.conv2.weight" in member) and (f"layer4.{blocks}.conv2.weight" not in member)
