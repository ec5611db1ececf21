"""ULRL's own pieces on hand-computed cases and tiny models: selection rule, scores, re-initialisation, penalty."""
import math

import pytest
import torch
import torch.nn as nn

from helpers import load_script
from utils.unlearning import neuron_weight_change

ulrl = load_script("defense/ulrl.py")

# Per-row scores of the reference run on blended_0_1 (spec/ulrl-reference-run.md): it selected row 0 only.
REFERENCE_SCORES = [24.45, 4.07, 1.40, 2.59, 3.48, 1.26, 2.40, 2.12, 3.23, 5.57]


def test_reference_scores_select_the_target_row():
    selected, z = ulrl.select_outliers(torch.tensor(REFERENCE_SCORES))
    assert selected == [0]
    # by hand: lower median 2.59, MAD = lower median of |s - 2.59| = 0.89
    assert float(z[0]) == pytest.approx((24.45 - 2.59) / (1.4826 * 0.89), rel=1e-5)
    assert float(z[9]) == pytest.approx((5.57 - 2.59) / (1.4826 * 0.89), rel=1e-5)


def test_lower_median_decides_an_even_count():
    # lower median 5, MAD 2 -> z(17) = 12 / 2.9652 = 4.05 > 3.5; the averaged median (5.5, MAD 2.5) gives 3.10
    scores = torch.tensor([1., 2., 3., 4., 5., 6., 7., 8., 9., 17.])
    selected, z = ulrl.select_outliers(scores)
    assert selected == [9]
    assert float(z[9]) == pytest.approx(12 / (1.4826 * 2), rel=1e-6)


def test_low_outliers_are_not_selected():
    scores = torch.tensor([5., 5.1, 4.9, 5.2, 4.8, 5.0, -40.0, 5.05])
    selected, z = ulrl.select_outliers(scores)
    assert float(z[6]) > 3.5
    assert selected == []


def test_cap_keeps_first_by_index_or_top_by_z():
    scores = torch.tensor([1.0, 1.1, 0.9, 1.05, 0.95, 1.02, 0.98, 1.07, 0.93, 1.03, 0.97, 1.01])  # MAD > 0
    scores[1], scores[4], scores[7] = 10.0, 20.0, 30.0
    first, z = ulrl.select_outliers(scores, selection="first", max_neurons=2)
    top, _ = ulrl.select_outliers(scores, selection="top", max_neurons=2)
    everything, _ = ulrl.select_outliers(scores, selection="first", max_neurons=0)
    assert first == [1, 4]
    assert top == [7, 4]
    assert everything == [1, 4, 7]
    assert float(z[7]) > float(z[4]) > float(z[1]) > 3.5


def test_no_outlier_selects_nothing():
    assert ulrl.select_outliers(torch.tensor([1.0, 1.1, 0.9, 1.05, 0.95]))[0] == []


def test_weight_change_scores_are_row_l1_norms():
    before = torch.zeros(3, 2, 2)
    after = torch.tensor([[[1., -1.], [0., 0.]], [[0., 0.], [0., 0.]], [[0.5, 0.5], [-2., 0.]]])
    assert neuron_weight_change(before, after).tolist() == [2.0, 0.0, 3.0]


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _args(**overrides):
    values = dict(scope="head", linear_name=None, init=True, mad_threshold=3.5, max_neurons=2, selection="first")
    values.update(overrides)
    return type("Args", (), values)()


def test_reinitialise_redraws_selected_rows_within_bound_and_zeroes_bias():
    torch.manual_seed(0)
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    originals = ulrl.reinitialise(model, {"fc": [1, 3]}, _args())
    bound = math.sqrt(2.0 / 4)
    weight, index, original = originals[0]
    assert weight is model.fc.weight and index.tolist() == [1, 3]
    assert torch.equal(original, before["fc.weight"][[1, 3]])
    assert not torch.equal(model.fc.weight[[1, 3]], before["fc.weight"][[1, 3]])
    assert model.fc.weight[[1, 3]].abs().max() <= bound
    assert model.fc.bias[[1, 3]].abs().sum() == 0
    untouched = [0, 2, 4]
    assert torch.equal(model.fc.weight[untouched], before["fc.weight"][untouched])
    assert torch.equal(model.fc.bias[untouched], before["fc.bias"][untouched])
    assert torch.equal(model.conv.weight, before["conv.weight"])


def test_reinitialise_without_init_keeps_weights_but_returns_originals():
    model = TinyNet()
    before = model.fc.weight.detach().clone()
    originals = ulrl.reinitialise(model, {"fc": [2]}, _args(init=False))
    assert torch.equal(model.fc.weight, before)
    assert torch.equal(originals[0][2], before[[2]])


def test_reinitialise_conv_channels_uses_their_fan_in():
    torch.manual_seed(0)
    model = TinyNet()
    ulrl.reinitialise(model, {"conv": [0]}, _args(scope="all"))
    assert model.conv.weight[0].abs().max() <= math.sqrt(2.0 / (3 * 3 * 3))
    assert float(model.conv.bias[0]) == 0.0


def test_scored_layers_head_and_all():
    model = TinyNet()
    assert list(ulrl.scored_layers(model, _args(), 5)) == ["fc"]
    assert list(ulrl.scored_layers(model, _args(scope="all"), 5)) == ["conv", "fc"]


def test_select_neurons_per_layer_finds_the_moved_channel():
    torch.manual_seed(0)
    model = TinyNet()
    layers = ulrl.scored_layers(model, _args(scope="all"), 5)
    before = {name: module.weight.detach().clone() for name, module in layers.items()}
    with torch.no_grad():
        model.fc.weight.add_(0.001 * torch.randn_like(model.fc.weight))
        model.fc.weight[3] += 5.0
        model.conv.weight.add_(0.001)  # every channel moves alike: no outlier

    class Quiet:
        def info(self, message):
            pass

    selected, table = ulrl.select_neurons(layers, before, _args(scope="all"), Quiet())
    assert selected == {"fc": [3]}
    assert len(table) == 4 + 5
    assert [row["neuron"] for row in table if row["selected"]] == [3]


# ---------------------------------------------------------------- feature pruning (an option)

def test_target_contributions_are_activation_times_gradient():
    from fakes import small_data, tiny
    model, data = tiny(), small_data(count=10)
    contributions = ulrl.target_contributions(model, data, target=2, batch_size=4)
    assert list(contributions) == ["conv"] and contributions["conv"].shape == (4,)
    # by hand: one image at a time, the conv output's channel sum of a * d(logit_2)/da, averaged
    expected = torch.zeros(4)
    for i in range(len(data)):
        x = data.normalise(data.images[i:i + 1])
        out = model.conv(x).detach().requires_grad_(True)
        rest = torch.relu(model.bn(out)).mean((2, 3))
        logit = model.head(model.plain(torch.relu(model.bn_fc(model.fc(rest)))))[0, 2]
        (grad,) = torch.autograd.grad(logit, out)
        expected += (out * grad).sum((0, 2, 3)).detach()
    assert torch.allclose(contributions["conv"], expected / len(data), atol=1e-5)
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_channel_ranking_orders_every_conv_channel_by_contribution():
    ranking = ulrl.channel_ranking({"a": torch.tensor([0.5, -1.0]), "b": torch.tensor([2.0, 0.5, 0.1])})
    assert ranking == [("b", 0), ("a", 0), ("b", 1), ("b", 2), ("a", 1)]


def test_zeroed_channels_stay_zero_while_training():
    from fakes import tiny
    model = tiny().train()
    handles = ulrl.zero_channels(model, [("conv", 1), ("conv", 3)])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(6, 3, 8, 8)).sum().backward()
        optimizer.step()
    assert model.conv.weight[[1, 3]].abs().sum() == 0 and model.conv.bias[[1, 3]].abs().sum() == 0
    assert model.conv.weight[[0, 2]].abs().sum() > 0
    for handle in handles:
        handle.remove()
    model.conv.weight.grad = None
    model(torch.randn(6, 3, 8, 8)).sum().backward()
    assert model.conv.weight.grad[[1, 3]].abs().sum() > 0  # hooks removed: the channels are free again


def test_unlearned_target_is_the_most_predicted_class():
    from fakes import small_data
    data = small_data(count=9)

    class Always(nn.Module):
        def forward(self, x):
            return torch.tensor([0.0, 0.0, 1.0]).expand(len(x), 3)

    assert ulrl.unlearned_target(Always(), data) == 2


def test_bad_prune_shares_are_one_clear_error():
    from types import SimpleNamespace
    from utils.errors import UserError
    args = SimpleNamespace(unlearning_epochs=1, relearn_epochs=1, prune_shares=[0.1, 1.5], prune_tolerance=0.02)
    with pytest.raises(UserError, match="prune_shares"):
        ulrl.check_args(args)
