"""FP (defense/fp.py): where it prunes (or a clear refusal), least-active channels first, the clean-subset rule that
stops at the first share outside the tolerance without reading the test sets, pruned columns kept at zero while
fine-tuning, options, and end to end on the shared record."""
import json
from contextlib import nullcontext
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import torch.nn as nn

from helpers import load_script, run_defense_on_shared_record
from fakes import fake_run
from utils.defense_setup import defense_defaults, parse_defense_args
from utils.errors import UserError
from utils.model_graph import find_prunable_channels, mean_channel_activation
from utils.tensor_data import DeviceImages

fp = load_script("defense/fp.py")
DEFAULTS = defense_defaults(fp.build_parser(), "fp")
ACTIVITY = [5.0, 0.1, 3.0, 0.2, 4.0, 1.0]  # each channel's constant activation in Probe: order 1, 3, 5, 2, 4, 0


class Probe(nn.Module):
    """A 1x1 conv whose channels are constant (their biases) -> ReLU -> global pooling -> Linear head."""

    def __init__(self, pool=None, between=None, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, len(ACTIVITY), 1)
        self.pool = pool if pool is not None else nn.AdaptiveAvgPool2d(1)
        self.between = between if between is not None else nn.Identity()
        self.head = nn.Linear(len(ACTIVITY), 3)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.copy_(torch.tensor(ACTIVITY))

    def forward(self, x):
        return self.head(self.between(torch.flatten(self.pool(torch.relu(self.conv(x))), 1)))


def data(count=24, seed=0):
    images = torch.randint(0, 256, (count, 8, 8, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return DeviceImages(images.numpy(), [i % 3 for i in range(count)], "cpu", (0.5,) * 3, (0.25,) * 3)


def batch():
    return next(data().batches(8))[0]


def test_defaults_are_backdoorbenchs_from_the_yaml():
    args = parse_defense_args(fp.build_parser(), ["--result_file", "x", "--yaml_path",
                                                     "config/defense/fp/cifar10.yaml"], "fp")
    assert (args.ratio, args.batch_size, args.epochs, args.lr, args.sgd_momentum, args.wd, args.lr_scheduler) == (
        0.05, 256, 100, 0.01, 0.9, 0.0005, "CosineAnnealingLR")
    assert (args.pruning_step, args.acc_tolerance, args.holdout_ratio, args.sweep, args.pool_name) == (
        0.01, 0.1, 0.2, False, None)


@pytest.mark.parametrize("extra, message", [
    (["--acc_tolerance", "-0.1"], "--acc_tolerance"),
    (["--holdout_ratio", "1"], "--holdout_ratio"),
    (["--pruning_step", "0"], "--pruning_step"),
    (["--pruning_max", "1.5"], "--pruning_max"),
    (["--epochs", "-1"], "--epochs"),
])
def test_bad_options_are_clear_errors_before_anything_is_loaded(extra, message):
    with pytest.raises(UserError, match=message):
        fp.main(["--result_file", "nowhere", *extra])


@pytest.mark.parametrize("pool", [nn.AdaptiveAvgPool2d(1), nn.AdaptiveMaxPool2d((1, 1))])
def test_the_channels_entering_global_pooling_are_found_with_the_head_that_reads_them(pool):
    target = find_prunable_channels(Probe(pool), batch())
    assert (target.pool_name, target.linear_name, target.channels) == ("pool", "head", len(ACTIVITY))


def test_a_model_without_global_pooling_is_one_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    with pytest.raises(UserError, match="no AdaptiveAvgPool2d/AdaptiveMaxPool2d with a 1x1 output") as error:
        find_prunable_channels(model, batch())
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="no module named 'nothing'"):
        find_prunable_channels(model, batch(), "nothing")


def test_a_layer_that_mixes_channels_after_the_pooling_is_refused():
    """LayerNorm over the pooled features: zeroing head columns would not remove the channels."""
    with pytest.raises(UserError, match="mixes channels"):
        find_prunable_channels(Probe(between=nn.LayerNorm(len(ACTIVITY))), batch())


def test_mean_activation_is_each_channels_average_and_the_least_active_come_first():
    model = Probe()
    activation = mean_channel_activation(model, model.pool, data(), 7)
    assert torch.allclose(activation, torch.tensor(ACTIVITY))
    assert torch.argsort(activation, stable=True).tolist() == [1, 3, 5, 2, 4, 0]


def test_zeroing_columns_is_silencing_exactly_those_channels():
    pruned, silenced = Probe(), Probe()
    original = pruned.head.weight.detach().clone()
    fp.zero_columns(pruned.head, original, [1, 3])
    assert (pruned.head.weight[:, [1, 3]] == 0).all()
    assert torch.equal(pruned.head.weight[:, [0, 2, 4, 5]], original[:, [0, 2, 4, 5]])
    with torch.no_grad():
        silenced.conv.bias[[1, 3]] = 0  # the same channels output zero before the pooling instead
        assert torch.allclose(pruned(batch()), silenced(batch()))
        assert not torch.allclose(Probe()(batch()), silenced(batch()))


def rule_run(accuracies, sweep=False, **options):
    """A fake run whose held-out accuracies follow `accuracies` (one per evaluated share); evaluating the test sets
    fails unless --sweep asks for it."""
    run = fake_run(DEFAULTS, pruning_step=0.2, pruning_max=0.8, acc_tolerance=0.1, sweep=sweep, **options)
    script = iter(accuracies)

    def test_sets(_model):
        assert sweep, "the pruning rule read the test sets"
        return {"test_acc": 0.5, "test_asr": 0.5, "test_ra": 0.5}

    run.phase = lambda _name: nullcontext()
    run.evaluate = test_sets
    run.setup.eval_sets = SimpleNamespace(images=lambda: 10)
    run.judged = lambda: next(script)
    return run


def test_the_rule_keeps_the_largest_share_before_the_first_one_outside_the_tolerance(monkeypatch, tmp_path):
    model = Probe()
    target = find_prunable_channels(model, batch())
    run = rule_run([0.9, 0.85, 0.79, 0.95, 0.95])  # 0.79 < 0.9 - 0.1: stop there; the later 0.95 is never tried
    run.path = tmp_path
    monkeypatch.setattr(fp, "accuracy", lambda *_args: run.judged())
    original = model.head.weight.detach().clone()
    share, count, judged = fp.choose_amount(run, model, target, [1, 3, 5, 2, 4, 0], data(5))
    assert share == 0.2 and count == fp.channels_at(0.2, 6) == 1
    assert [row["share"] for row in judged] == [0.0, 0.2, 0.4]  # stopped at the first share outside
    assert [row["pruned_channels"] for row in judged] == [0, 1, 2]
    assert torch.equal(model.head.weight, original)  # handed back unpruned
    assert not (tmp_path / "pruning_sweep.csv").exists()


def test_the_sweep_reads_the_test_sets_but_does_not_change_the_choice(monkeypatch, tmp_path):
    model = Probe()
    target = find_prunable_channels(model, batch())
    run = rule_run([0.9, 0.85, 0.79], sweep=True)
    run.path = tmp_path
    monkeypatch.setattr(fp, "accuracy", lambda *_args: run.judged())
    share, _, judged = fp.choose_amount(run, model, target, [1, 3, 5, 2, 4, 0], data(5))
    assert share == 0.2 and len(judged) == 3
    sweep = pd.read_csv(tmp_path / "pruning_sweep.csv")
    assert sweep["share"].tolist() == [0.0, 0.2, 0.4, 0.6, 0.8] and sweep["test_asr"].notna().all()


def test_finetuning_keeps_the_pruned_columns_at_zero_and_trains_the_rest():
    model = Probe()
    original = model.head.weight.detach().clone()
    fp.zero_columns(model.head, original, [1, 3])
    pruned_once = model.head.weight.detach().clone()
    run = fake_run(DEFAULTS, epochs=2, lr=0.5, wd=0.01)
    run.setup.clean_subset = data()
    rows = fp.finetune(run, model, model.head, [1, 3])
    assert len(rows) == 2
    assert (model.head.weight[:, [1, 3]] == 0).all()  # momentum and weight decay did not move them
    assert not torch.allclose(model.head.weight[:, [0, 2]], pruned_once[:, [0, 2]])
    model.zero_grad()
    model(batch()).sum().backward()
    assert model.head.weight.grad[:, [1, 3]].abs().sum() > 0  # the gradient mask is gone after fine-tuning


@pytest.fixture(scope="module")
def fp_run(tmp_path_factory):
    return run_defense_on_shared_record(tmp_path_factory.mktemp("fp"), "defense/fp.py",
                                        "config/defense/fp/cifar10.yaml", "--epochs", 1, "--ratio", 0.002,
                                        "--pruning_step", 0.1, eval_limit=100)


def test_fp_end_to_end_prunes_from_clean_data_and_reports(fp_run):
    folder, result = fp_run
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads((folder / "summary.json").read_text())
    pruning = summary["pruning"]
    assert pruning["pool"] == "avgpool" and pruning["linear"] == "linear" and pruning["total_channels"] == 512
    assert pruning["holdout_samples"] == 20 and pruning["activation_samples"] == 80
    assert len(pruning["pruned_channel_indices"]) == pruning["pruned_channels"]
    channels = pd.read_csv(folder / "channel_activation.csv")
    pruned = channels[channels["pruned"]]
    if len(pruned):  # the pruned channels are the least active ones
        assert pruned["mean_activation"].max() <= channels[~channels["pruned"]]["mean_activation"].min()
    rule = pd.read_csv(folder / "pruning_rule.csv")
    assert rule["holdout_acc"].notna().all() and "test_acc" not in rule
    assert not (folder / "pruning_sweep.csv").exists()
    saved = torch.load(folder / "defense_result.pt", weights_only=True)["model"]
    assert (saved["linear.weight"][:, pruning["pruned_channel_indices"]] == 0).all()
    assert "FP: ACC" in result.stdout + result.stderr
