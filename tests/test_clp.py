"""CLP (defense/clp.py): the per-channel Lipschitz bound against an explicit SVD, the mean + u * std rule, pruning,
conv -> BatchNorm pairing (traced and module order) on every registered model, errors, and end to end."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

from helpers import build_for_shapes, load_script, run_defense_on_shared_record
from utils.defense_setup import parse_defense_args
from utils.errors import UserError
from utils.models import MODELS, build_model, load_weights

clp = load_script("defense/clp.py")

# registered models without a single BatchNorm2d: CLP does not apply to them and says so
WITHOUT_BATCHNORM = {"vgg11", "vgg16", "vgg19", "convnext_tiny", "vit_b_16"}
# post-activation networks, where the data flow and the module order give the same pairs
POST_ACTIVATION = {"airbench_cpu", "resnet18", "resnet50", "vgg19_bn", "mobilenet_v2", "efficientnet_b0"}


def _conv_bn(out_channels=3, in_channels=2, kernel=3, groups=1):
    torch.manual_seed(0)
    conv = nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, groups=groups, bias=False)
    bn = nn.BatchNorm2d(out_channels)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(-1.5, 2.0, out_channels))  # a negative gamma: its absolute value counts
        bn.bias.copy_(torch.linspace(0.1, 0.3, out_channels))
        bn.running_var.copy_(torch.linspace(0.25, 4.0, out_channels))
    return conv.requires_grad_(False), bn.requires_grad_(False)


@pytest.mark.parametrize("groups", [1, 2])
def test_bound_is_the_largest_singular_value_of_the_scaled_filter(groups):
    conv, bn = _conv_bn(out_channels=4, in_channels=4, groups=groups)
    bounds = clp.channel_lipschitz_bounds(conv, bn)
    weight = conv.weight.detach().numpy().astype(np.float64)
    for k in range(4):
        scale = abs(float(bn.weight[k])) / np.sqrt(float(bn.running_var[k]) + bn.eps)
        matrix = weight[k].reshape(weight.shape[1], -1) * scale  # (in_channels / groups) x (3 * 3)
        assert float(bounds[k]) == pytest.approx(np.linalg.svd(matrix, compute_uv=False)[0], rel=1e-5)


def test_a_1x1_filter_bound_is_its_scaled_l2_norm():
    conv, bn = _conv_bn(out_channels=3, in_channels=5, kernel=1)
    scale = bn.weight.detach().abs() / torch.sqrt(bn.running_var + bn.eps)
    expected = conv.weight.detach().flatten(1).norm(dim=1) * scale
    assert torch.allclose(clp.channel_lipschitz_bounds(conv, bn), expected, rtol=1e-5)


def test_mean_plus_u_std_rule_by_hand():
    values = torch.tensor([0.0, 0.0, 0.0, 4.0])  # mean 1, unbiased std sqrt(12 / 3) = 2
    assert clp.outlier_channels(values, 1.0) == ([3], 3.0)  # 4 > 1 + 1 * 2
    assert clp.outlier_channels(values, 1.5) == ([], 4.0)  # 4 is not above 1 + 1.5 * 2: strictly greater
    assert clp.outlier_channels(values, -1.0)[0] == [0, 1, 2, 3]  # threshold -1
    flat = torch.full((6,), 2.5)
    assert clp.outlier_channels(flat, 0.0)[0] == []  # std 0: nothing exceeds the mean


def test_pruning_zeroes_exactly_the_outlying_channels_of_each_layer():
    conv, bn = _conv_bn(out_channels=5)
    model = nn.Sequential(conv, bn, nn.ReLU(), nn.Conv2d(5, 4, 3), nn.BatchNorm2d(4)).requires_grad_(False)
    weight, bias = bn.weight.clone(), bn.bias.clone()
    # layer 1: mean 1.6, unbiased std sqrt(4.8) = 2.19, threshold at u 0.5 2.70; layer 4: 9 is a low outlier only
    scored = {"1": torch.tensor([0.0, 4.0, 0.0, 4.0, 0.0]), "4": torch.tensor([10.0, 10.0, 10.0, 9.0])}
    decisions = clp.prune(model, scored, 0.5)
    assert decisions["1"] == ([1, 3], pytest.approx(1.6 + 0.5 * 4.8 ** 0.5)) and decisions["4"][0] == []
    assert bn.weight[[1, 3]].abs().sum() == 0 and bn.bias[[1, 3]].abs().sum() == 0
    assert torch.equal(bn.weight[[0, 2, 4]], weight[[0, 2, 4]]) and torch.equal(bn.bias[[0, 2, 4]], bias[[0, 2, 4]])
    assert model[4].weight.abs().min() > 0
    with torch.no_grad():
        out = nn.Sequential(conv, bn).eval()(torch.randn(2, 2, 6, 6))
    assert out[:, [1, 3]].abs().max() == 0 and out[:, 0].abs().max() > 0


class PreActBlockOnly(nn.Module):
    """BatchNorm -> conv only: a BatchNorm that no conv feeds."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(torch.relu(self.bn(x)))


@pytest.mark.parametrize("model,message", [
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2)), "no BatchNorm2d"),
    (nn.Sequential(nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 8 * 8, 2)), "no Conv2d"),
    (PreActBlockOnly(), "no Conv2d whose output feeds a BatchNorm2d"),
])
def test_models_without_conv_bn_pairs_are_one_clear_error(model, message):
    with pytest.raises(UserError, match=message):
        clp.conv_bn_pairs(model, (8, 8, 3))


def test_a_model_that_cannot_be_traced_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 30 * 30, 2))
    with pytest.raises(UserError, match="could not trace"):
        clp.conv_bn_pairs(model, (8, 8, 3))  # the head expects 32x32 images
    assert [(c, b) for c, _, b, _ in clp.conv_bn_pairs(model, (8, 8, 3), "module_order")] == [("0", "1")]


def test_preactresnet18_pairs_follow_the_data_and_module_order_is_backdoorbenchs():
    model = build_model("preactresnet18", 10)
    traced = [(conv, bn) for conv, _, bn, _ in clp.conv_bn_pairs(model, (32, 32, 3), "traced")]
    assert traced[0] == ("conv1", "layer1.0.bn1")
    assert traced[1:] == [(f"layer{i}.{j}.conv1", f"layer{i}.{j}.bn2") for i in range(1, 5) for j in (0, 1)]
    ordered = [(conv, bn) for conv, _, bn, _ in clp.conv_bn_pairs(model, (32, 32, 3), "module_order")]
    assert len(ordered) == 16  # every BatchNorm2d, each with the conv registered before it
    assert ("layer2.0.shortcut.0", "layer2.1.bn1") in ordered and ("layer1.0.conv2", "layer1.1.bn1") in ordered
    assert all(module.training for module in model.modules())  # tracing left the training mode as it was


def test_tracing_passes_through_pooling_and_keeps_running_statistics():
    model = build_model("airbench_cpu", 10)
    model.train()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    pairs = [(conv, bn) for conv, _, bn, _ in clp.conv_bn_pairs(model, (32, 32, 3))]
    assert ("layers.0.conv1", "layers.0.bn1") in pairs  # conv -> max-pool -> BatchNorm
    assert len(pairs) == 6
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_model_is_paired_or_refused(name):
    model = build_for_shapes(name)
    if name in WITHOUT_BATCHNORM:
        with pytest.raises(UserError, match="no BatchNorm2d"):
            clp.conv_bn_pairs(model, (32, 32, 3))
        return
    traced = clp.conv_bn_pairs(model, (32, 32, 3))
    assert traced and all(conv.out_channels == bn.num_features for _, conv, _, bn in traced)
    assert len({bn for _, _, bn, _ in traced}) == len(traced)
    if name in POST_ACTIVATION:
        ordered = clp.conv_bn_pairs(model, (32, 32, 3), "module_order")
        assert [(c, b) for c, _, b, _ in traced] == [(c, b) for c, _, b, _ in ordered]


def test_defaults_from_the_yaml():
    args = parse_defense_args(clp.build_parser(), ["--result_file", "x", "--yaml_path",
                                                      "config/defense/clp/cifar10.yaml"], "clp")
    assert (args.u, args.pairing, args.sweep, args.u_min, args.u_max, args.u_num) == (3.0, "traced", False, 0, 10, 21)


@pytest.mark.parametrize("argv,option", [(["--sweep", "True", "--u_num", "0"], "--u_num"),
                                         (["--sweep", "True", "--u_min", "5", "--u_max", "1"], "--u_min"),
                                         (["--u", "nan"], "--u")])
def test_bad_options_are_clear_errors(argv, option):
    with pytest.raises(UserError, match=option):
        clp.main(["--result_file", "nowhere", *argv])


@pytest.fixture(scope="module")
def clp_run(tmp_path_factory):
    return run_defense_on_shared_record(tmp_path_factory.mktemp("clp"), "defense/clp.py",
                                        "config/defense/clp/cifar10.yaml", "--ratio", 0.002, "--sweep", "True",
                                        "--u_min", 2, "--u_max", 3, "--u_num", 2)


def test_clp_end_to_end_prunes_the_reported_channels_of_the_saved_model(clp_run):
    folder, result = clp_run
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "CLP: ACC" in result.stdout + result.stderr
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["defense"] == "clp" and summary["u"] == 3 and summary["pairs_scored"] == 9
    assert 0 <= summary["clean_subset_acc_after"] <= 1 and summary["images"]["clean_subset_check"] == 2 * 100
    table = pd.read_csv(folder / "channel_lipschitz.csv")
    assert list(table.columns[:4]) == ["layer", "bn", "channel", "lipschitz_upper_bound"]
    assert len(table) == summary["channels_scored"] == 64 + 64 * 2 + 128 * 2 + 256 * 2 + 512 * 2
    pruned = table[table["pruned"]]
    assert len(pruned) == summary["pruned_count"] > 0
    assert (pruned["lipschitz_upper_bound"] > pruned["threshold"]).all()
    assert (table[~table["pruned"]]["lipschitz_upper_bound"] <= table[~table["pruned"]]["threshold"]).all()

    saved = load_weights(build_model("preactresnet18", 10),
                         torch.load(folder / "defense_result.pt", weights_only=True)["model"]).state_dict()
    from conftest import SHARED_RECORDS
    from utils.records import load_attack_record
    original = load_attack_record("badnet_0_1", SHARED_RECORDS).state_dict
    zeroed = {(key[:-len(".weight")], index) for key, value in saved.items() if key.endswith(".weight")
              and value.ndim == 1 and "bn" in key for index in torch.nonzero(value == 0).flatten().tolist()}
    assert zeroed == set(zip(pruned["bn"], pruned["channel"]))
    changed = [key for key, value in saved.items() if not torch.equal(value, original[key].to(value.dtype))]
    assert set(changed) <= {f"{bn}.{part}" for bn in pruned["bn"] for part in ("weight", "bias")}

    sweep = pd.read_csv(folder / "u_sweep_test_metrics.csv")
    assert list(sweep["u"]) == [2.0, 3.0] and sweep["note"].str.contains("analysis only").all()
    assert sweep["pruned_channels"].iloc[0] >= sweep["pruned_channels"].iloc[1] == summary["pruned_count"]
    assert sweep["test_acc"].iloc[1] == pytest.approx(summary["after"]["test_acc"])  # the saved model is u = 3's
