"""utils/pruning.py, shared by RNP and ANP: BatchNorm layers or a clear error over the whole model registry, channel
masks by hooks, pruning exactly the chosen channels, which channels and how many (the clean-subset rule)."""
import types

import pytest
import torch
import torch.nn as nn

from fakes import tiny
from utils.errors import UserError
from utils.models import MODELS, build_model
from utils.pruning import (BatchNormMasks, batchnorm_layers, candidate_amounts, channels_to_prune,
                           check_pruning_args, mask_table, prune_channels, split_for_rule)
from utils.selection import largest_within_tolerance
from utils.tensor_data import DeviceImages

NO_BATCHNORM = {"vgg11", "vgg16", "vgg19", "vit_b_16", "convnext_tiny"}  # plain VGGs, LayerNorm models


def test_batchnorm_layers_are_the_affine_ones_in_module_order():
    assert list(batchnorm_layers(tiny())) == ["bn", "bn_fc"]


def test_a_model_without_batchnorm_is_one_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    with pytest.raises(UserError, match="RNP masks and prunes BatchNorm channels.*no BatchNorm"):
        batchnorm_layers(model, "RNP")
    with pytest.raises(UserError, match="ANP"):
        BatchNormMasks(model, "ANP", noise=True)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_model_is_masked_or_refused_clearly(name):
    model = build_model(name, 10, (32, 32, 3)).eval()
    if name in NO_BATCHNORM:
        with pytest.raises(UserError, match="no BatchNorm"):
            BatchNormMasks(model, "RNP")
        return
    ran = []
    with BatchNormMasks(model, "RNP") as masks:
        assert masks.masks and all(mask.shape == (module.num_features,) and bool((mask == 1).all())
                                   for mask, module in zip(masks.parameters(), masks.layers.values()))
        for name_, module in masks.layers.items():  # hooks run in registration order: after the mask's
            module.register_forward_hook(lambda module, args, out, name_=name_: ran.append(name_))
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
    assert set(ran) == set(masks.layers)  # every masked layer takes part in the forward pass
    assert all(len(module._forward_hooks) == 1 for module in masks.layers.values())  # the mask hooks are gone


def test_mask_gradients_flow_through_in_place_activations():
    model = build_model("resnet18", 10, (32, 32, 3)).train()  # BN -> ReLU(inplace=True)
    model.requires_grad_(False)
    with BatchNormMasks(model) as masks:
        model(torch.randn(2, 3, 32, 32)).square().sum().backward()
        assert all(mask.grad is not None and mask.grad.abs().sum() > 0 for mask in masks.parameters())


def test_masks_at_one_leave_the_output_unchanged_and_removal_restores_it():
    model, x = tiny(), torch.randn(5, 3, 8, 8)
    expected = model(x)
    with BatchNormMasks(model) as masks:
        assert [tuple(m.shape) for m in masks.parameters()] == [(4,), (6,)]
        assert torch.allclose(model(x), expected, atol=1e-6)
        with torch.no_grad():
            masks.masks["bn"][1] = 0.3
        assert not torch.allclose(model(x), expected, atol=1e-3)
    assert torch.equal(model(x), expected)


def test_mask_scales_gamma_only_and_a_zero_mask_is_the_pruned_channel():
    model, x = tiny(), torch.randn(5, 3, 8, 8)
    bn_out = {}
    plain = model.bn(model.conv(x)).detach()
    with BatchNormMasks(model) as masks:
        model.bn.register_forward_hook(lambda module, args, out: bn_out.update(out=out.detach()))  # after the mask
        with torch.no_grad():
            masks.masks["bn"].copy_(torch.tensor([1.0, 0.5, 0.0, 0.25]))
        masked_logits = model(x)
        masked = bn_out["out"]
    beta = model.bn.bias.detach().view(1, -1, 1, 1)
    # output - beta = gamma * x_hat is scaled by the mask; beta stays
    assert torch.allclose(masked - beta, (plain - beta) * torch.tensor([1.0, 0.5, 0.0, 0.25]).view(1, -1, 1, 1),
                          atol=1e-6)
    pruned = prune_channels(tiny(), {"bn": [2]})
    with torch.no_grad():
        pruned.bn_fc.weight.copy_(model.bn_fc.weight)
    with BatchNormMasks(pruned) as masks:
        with torch.no_grad():
            masks.masks["bn"].copy_(torch.tensor([1.0, 0.5, 1.0, 0.25]))
        assert torch.allclose(pruned(x), masked_logits, atol=1e-5)


def test_pruning_zeroes_exactly_the_chosen_channels():
    original, x = tiny(), torch.randn(7, 3, 8, 8)
    model = prune_channels(tiny(), {"bn": [0, 3], "bn_fc": [5]})
    assert model.bn.weight[[0, 3]].eq(0).all() and model.bn_fc.weight[5] == 0
    assert torch.equal(model.bn.weight[[1, 2]], original.bn.weight[[1, 2]])
    assert torch.equal(model.bn_fc.weight[:5], original.bn_fc.weight[:5])
    assert torch.equal(model.bn.bias, original.bn.bias)  # the shift stays (the reference zeroes gamma only)
    outputs = {}
    model.bn.register_forward_hook(lambda module, args, out: outputs.update(bn=out.detach()))
    original.bn.register_forward_hook(lambda module, args, out: outputs.update(original=out.detach()))
    model(x), original(x)
    # a pruned channel outputs its shift beta whatever the input; the others are untouched
    assert torch.allclose(outputs["bn"][:, [0, 3]], model.bn.bias[[0, 3]].detach().view(1, 2, 1, 1).expand(7, 2, 8, 8))
    assert torch.equal(outputs["bn"][:, [1, 2]], outputs["original"][:, [1, 2]])

    zeroed = prune_channels(tiny(), {"bn": [0, 3]}, zero_bias=True)
    zeroed.bn.register_forward_hook(lambda module, args, out: outputs.update(zeroed=out.detach()))
    zeroed(x)
    assert outputs["zeroed"][:, [0, 3]].abs().max() == 0 and zeroed.bn.bias[[0, 3]].eq(0).all()
    assert torch.equal(outputs["zeroed"][:, [1, 2]], outputs["original"][:, [1, 2]])


def test_pruning_a_layer_that_is_no_batchnorm_is_a_clear_error():
    with pytest.raises(UserError, match="not a BatchNorm"):
        prune_channels(tiny(), {"conv": [0]})
    with pytest.raises(UserError, match="not a BatchNorm"):
        prune_channels(tiny(), {"plain": [0]})
    with pytest.raises(UserError, match=r"\[0, 4\)"):
        prune_channels(tiny(), {"bn": [4]})


VALUES = {"a": torch.tensor([0.9, 0.0, 0.2, 0.5]), "b": torch.tensor([0.2, 1.0, 0.05])}


def test_threshold_prunes_masks_at_or_below_it_and_number_the_lowest():
    assert channels_to_prune(VALUES, "threshold", 0.2) == {"a": [1, 2], "b": [0, 2]}
    assert channels_to_prune(VALUES, "threshold", 0.0) == {"a": [1]}
    assert channels_to_prune(VALUES, "threshold", 1.0) == {"a": [0, 1, 2, 3], "b": [0, 1, 2]}
    # lowest first: a1 (0.0), b2 (0.05), then the tie at 0.2 in module order: a2 before b0
    assert channels_to_prune(VALUES, "number", 3) == {"a": [1, 2], "b": [2]}
    assert channels_to_prune(VALUES, "number", 0) == {}


def test_mask_table_lists_every_channel_with_its_decision():
    rows = mask_table(VALUES, {"a": [1]})
    assert len(rows) == 7 and rows[1] == {"layer": "a", "channel": 1, "mask": 0.0, "pruned": True}
    assert sum(row["pruned"] for row in rows) == 1


def test_candidate_amounts_are_the_grid_up_to_the_maximum():
    assert candidate_amounts("threshold", 0.9, 0.05)[-1] == 0.9 and len(candidate_amounts("threshold", 0.9, 0.05)) == 19
    assert candidate_amounts("threshold", 0.3, 0.1) == [0.0, 0.1, 0.2, 0.3]
    assert candidate_amounts("number", 50, 20) == [0, 20, 40]
    with pytest.raises(UserError, match="pruning_step"):
        candidate_amounts("threshold", 0.5, 0)


def test_rule_picks_the_largest_amount_within_the_tolerance():
    amounts = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    curve = [0.90, 0.90, 0.88, 0.85, 0.87, 0.70]  # not monotone: 0.4 is back within 0.03 after 0.3 fell out
    assert largest_within_tolerance(amounts, curve, 0.90, 0.03) == 0.4
    assert largest_within_tolerance(amounts, curve, 0.90, 0.02) == 0.2
    assert largest_within_tolerance(amounts, curve, 0.90, 0.0) == 0.1
    assert largest_within_tolerance(amounts, curve, 0.90, 0.5) == 0.5
    assert largest_within_tolerance(amounts, curve, 0.95, 0.01) is None


def _args(**changes):
    values = {"pruning_by": "threshold", "pruning_number": 0.2, "pruning_max": 0.9, "pruning_step": 0.05,
              "acc_tolerance": None, "holdout_ratio": 0.2, "sweep": False, "prune_bias": False}
    values.update(changes)
    return types.SimpleNamespace(**values)


@pytest.mark.parametrize("changes, message", [
    ({"pruning_number": 1.5}, "threshold in \\[0, 1\\]"),
    ({"pruning_by": "number", "pruning_number": 2.5}, "whole --pruning_number"),
    ({"acc_tolerance": -0.1}, "acc_tolerance"),
    ({"acc_tolerance": 0.05, "holdout_ratio": 1.0}, "holdout_ratio"),
    ({"sweep": True, "pruning_step": 0.0}, "pruning_step"),
    ({"sweep": True, "pruning_by": "number", "pruning_number": 10}, "whole --pruning_max"),
])
def test_bad_pruning_options_are_clear_errors(changes, message):
    with pytest.raises(UserError, match=message):
        check_pruning_args(_args(**changes))
    check_pruning_args(_args())


def test_holdout_split_only_with_the_rule_and_disjoint():
    images = torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1).expand(50, 2, 2, 3).numpy()
    data = DeviceImages(images, list(range(50)), "cpu", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    same, none = split_for_rule(data, _args(), torch.Generator().manual_seed(0))
    assert same is data and none is None
    learn, held = split_for_rule(data, _args(acc_tolerance=0.05), torch.Generator().manual_seed(0))
    assert (len(learn), len(held)) == (40, 10)
    learned, kept = set(learn.labels.tolist()), set(held.labels.tolist())
    assert not learned & kept and learned | kept == set(range(50))
    # images travel with their labels, normalisation is kept
    assert torch.equal(held.images[:, 0, 0, 0].long(), held.labels)
    assert torch.equal(held.mean, data.mean) and torch.equal(held.std, data.std)
