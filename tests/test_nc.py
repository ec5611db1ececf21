"""NC (defense/nc.py): MAD anomaly index and small outliers (utils/outliers.py), cost schedule, stamping in normalised
space (utils/reversed_triggers.py), and the whole defense on a hand-made model whose bright bottom-right corner is a
backdoor to class 0."""
import json
import logging
import types

import pandas as pd
import pytest
import torch
import torch.nn as nn

from helpers import load_script
from utils.defense_run import DefenseRun
from utils.defense_setup import parse_defense_args
from utils.errors import UserError
from utils.outliers import anomaly_index, small_outliers
from utils.reversed_triggers import ReversedTriggers, stamp_normalised
from utils.tensor_data import Augmentation, DeviceImages

nc = load_script("defense/nc.py")
SIZE = 8


# ---------------------------------------------------------------- anomaly index

def test_anomaly_index_by_hand():
    # median 3, absolute deviations 2 1 0 1 97, their median 1: MAD 1.4826
    indices = anomaly_index([1.0, 2.0, 3.0, 4.0, 100.0])
    assert indices.tolist() == pytest.approx([2 / 1.4826, 1 / 1.4826, 0.0, 1 / 1.4826, 97 / 1.4826])


def test_a_small_outlier_is_flagged():
    norms = [10.0, 10.5, 9.5, 10.2, 9.8, 2.0]
    assert small_outliers(norms, 2) == [5]


def test_a_large_outlier_is_not_flagged():
    norms = [10.0, 10.5, 9.5, 10.2, 9.8, 30.0]
    assert anomaly_index(norms)[5] > 2
    assert small_outliers(norms, 2) == []


def test_uniform_norms_flag_nothing():
    assert anomaly_index([5.0] * 4).tolist() == [0.0] * 4
    assert small_outliers([5.0] * 4, 2) == []


def test_with_zero_mad_only_the_classes_off_the_median_are_infinite():
    indices = anomaly_index([5.0, 5.0, 5.0, 1.0])
    assert indices.tolist()[:3] == [0.0] * 3 and indices[3] == float("inf")
    assert small_outliers([5.0, 5.0, 5.0, 1.0], 2) == [3]


def test_several_flagged_classes_come_smallest_first():
    assert small_outliers([10.0, 3.0, 10.2, 9.9, 10.1, 1.0, 9.8], 2) == [5, 1]


# ---------------------------------------------------------------- cost schedule

def _options(**changes):
    values = dict(atk_succ_threshold=0.98, early_stop_threshold=0.99, early_stop_patience=3, patience=2,
                  mask_rounds=100)
    return types.SimpleNamespace(**{**values, **changes})


def test_cost_goes_up_after_patience_successes_and_down_after_patience_failures():
    search, options = nc.ClassSearch(cost=1e-3, multiplier=2.0), _options()
    assert search.end_round(1.0, 50.0, options)  # a successful, smaller mask is the new best
    assert search.cost == 1e-3
    assert not search.end_round(1.0, 60.0, options)  # successful but larger: not the best
    assert search.cost == pytest.approx(2e-3) and search.went_up and not search.went_down
    search.end_round(0.5, 40.0, options)
    assert not search.end_round(0.5, 40.0, options)  # smaller but unsuccessful: not the best
    assert search.cost == pytest.approx(2e-3 / 2 ** 1.5) and search.went_down
    assert search.best_norm == 50.0 and not search.stopped


def test_early_stop_needs_both_cost_moves_and_patience_rounds_without_improvement():
    search, options = nc.ClassSearch(cost=1e-3, multiplier=2.0), _options()
    for _ in range(6):
        search.end_round(1.0, 50.0, options)  # no improvement, but the cost never went down
    assert not search.stopped and search.went_up
    search.end_round(0.0, 50.0, options)
    search.end_round(0.0, 50.0, options)
    assert search.went_down and not search.stopped  # as the reference: the check comes before this round's move
    search.end_round(0.0, 50.0, options)
    assert search.stopped == "early stop" and search.rounds == 9


def test_the_round_budget_stops_a_class():
    search, options = nc.ClassSearch(cost=1e-3, multiplier=2.0), _options(mask_rounds=3)
    for improving_norm in (30.0, 20.0, 10.0):
        search.end_round(1.0, improving_norm, options)
    assert search.stopped == "budget" and search.rounds == 3


# ---------------------------------------------------------------- stamping

def test_stamping_the_normalised_batch_equals_normalising_the_stamped_pixels():
    torch.manual_seed(0)
    data = DeviceImages(torch.randint(0, 256, (5, SIZE, SIZE, 3), dtype=torch.uint8).numpy(), [0] * 5, "cpu",
                        (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    masks, patterns = torch.rand(2, 1, SIZE, SIZE), torch.rand(2, 3, SIZE, SIZE)
    x, _ = next(data.batches(5))
    stamped = stamp_normalised(x, masks, patterns, data)
    pixels = data.images.permute(0, 3, 1, 2).float()
    expected = torch.cat([data.from_pixels((1 - m) * pixels + m * p * 255) for m, p in zip(masks, patterns)])
    assert stamped.shape == (10, 3, SIZE, SIZE)
    assert torch.allclose(stamped, expected, atol=1e-5)


def test_unlearning_set_stamps_the_ratio_and_keeps_the_true_labels():
    data = _clean_data(count=40)
    masks, patterns = torch.zeros(4, 1, SIZE, SIZE), torch.ones(4, 3, SIZE, SIZE)
    masks[0, :, -2:, -2:] = 1
    triggers = ReversedTriggers(masks, patterns, [], [], 0)
    stamped, count = nc.unlearning_set(data, triggers, [0], 0.25, torch.Generator().manual_seed(0))
    changed = (stamped.images != data.images).flatten(1).any(1)
    assert count == 10 and int(changed.sum()) == 10
    assert (stamped.images[changed][:, -2:, -2:] == 255).all()
    assert torch.equal(stamped.labels, data.labels)


# ---------------------------------------------------------------- the defense on a hand-made backdoored model

class CornerBackdoor(nn.Module):
    """Clean rule: class 1 + the brightest colour channel (mean over the image). Backdoor: a bright 2x2
    bottom-right corner sends any image to class 0. A linear head over the four features, so unlearning can
    change it."""

    def __init__(self, backdoor_weight=20.0):
        super().__init__()
        self.head = nn.Linear(4, 4, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.diag(torch.tensor([backdoor_weight, 8.0, 8.0, 8.0])))

    def forward(self, x):
        corner = x[:, :, -2:, -2:].mean((1, 2, 3)) - 0.7  # normalised to [-1, 1]; clean corners stay below 0.42
        colour = x.mean((2, 3))
        return self.head(torch.cat([corner[:, None], colour - colour.mean(1, keepdim=True)], 1))


def _clean_data(count=64):
    """Pixels in [0, 120] with one channel lifted by 60: that channel decides the class (1, 2 or 3)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 121, (count, SIZE, SIZE, 3), generator=generator)
    dominant = torch.arange(count) % 3
    images[torch.arange(count), :, :, dominant] += 60
    return DeviceImages(images.to(torch.uint8).numpy(), (dominant + 1).numpy(), "cpu", (0.5,) * 3, (0.5,) * 3)


@pytest.fixture
def one_thread():
    """The toy's tensors are tiny: a second thread only adds synchronisation, which costs seconds on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(tmp_path, model, *options):
    args = parse_defense_args(nc.build_parser(), [
        "--result_file", "toy", "--progress", "False", "--mask_batch_size", "16", "--mask_rounds", "30",
        "--round_steps", "4", "--patience", "3", "--early_stop_patience", "10", "--batch_size", "16", *options], "nc")
    args.amp = False
    nc.check_args(args)
    setup = types.SimpleNamespace(args=args, device=torch.device("cpu"), seconds={}, model=model,
                                  clean_subset=_clean_data(), record=types.SimpleNamespace(num_classes=4),
                                  augmentation=Augmentation(crop_padding=0, flip=False))
    return DefenseRun(setup, tmp_path, logging.getLogger("test_nc"), "nc")


def _backdoor_success(model):
    data = _clean_data()
    stamped = data.images.clone()
    stamped[:, -2:, -2:] = 255
    with torch.no_grad():
        return float((model(data.normalise(stamped)).argmax(1) == 0).float().mean())


def test_the_implanted_target_gets_the_smallest_mask_is_flagged_and_unlearned(tmp_path, one_thread):
    torch.manual_seed(0)
    model = CornerBackdoor()
    model.eval()
    assert _backdoor_success(model) == 1.0
    before = {key: value.clone() for key, value in model.state_dict().items()}
    run = _run(tmp_path, model, "--epochs", "10", "--lr", "5", "--unlearning_ratio", "0.5")
    defended = nc.defend(run)
    table = pd.read_csv(tmp_path / "nc_classes.csv")
    norms = table["mask_norm"]
    assert int(norms.idxmin()) == 0 and norms[0] < 0.5 * norms[1:].min()
    assert table["reached_threshold"].all()
    assert run.summary["flagged_classes"] == [0] and table["flagged"].tolist() == [True, False, False, False]
    assert run.summary["anomaly_indices"][0] > 2 and run.summary["model_changed"]
    assert (tmp_path / "reversed_triggers.png").stat().st_size > 0
    saved = torch.load(tmp_path / "reversed_triggers.pt", weights_only=True)
    assert saved["masks"].shape == (4, 1, SIZE, SIZE)
    corner = saved["masks"][0, 0, -2:, -2:].sum()
    assert corner > 0.5 * saved["masks"][0].sum()  # class 0's mask sits mostly on the corner
    assert not torch.equal(defended.state_dict()["head.weight"], before["head.weight"])
    assert _backdoor_success(defended) < 0.5
    assert run.epoch_tables["nc_df"] and run.images["reverse_engineer"] > 0
    json.dumps(run.summary)  # plain values only


def test_no_flagged_class_returns_the_model_unchanged(tmp_path, one_thread):
    model = CornerBackdoor()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    run = _run(tmp_path, model, "--anomaly_threshold", "1e9", "--mask_rounds", "4")
    defended = nc.defend(run)
    assert defended is model
    assert all(torch.equal(value, before[key]) for key, value in defended.state_dict().items())
    assert run.summary["flagged_classes"] == [] and not run.summary["model_changed"]
    assert "unchanged" in run.summary["outcome"] and "nc_df" not in run.epoch_tables
    assert (tmp_path / "nc_classes.csv").is_file() and (tmp_path / "reversed_triggers.png").is_file()


# ---------------------------------------------------------------- options

def test_defaults_come_from_the_yaml():
    args = parse_defense_args(nc.build_parser(), ["--result_file", "x", "--yaml_path",
                                                     "config/defense/nc/cifar10.yaml"], "nc")
    assert (args.ratio, args.init_cost, args.mask_lr, args.anomaly_threshold, args.unlearning_ratio,
            args.cost_multiplier, args.atk_succ_threshold) == (0.05, 1e-3, 0.1, 2.0, 0.2, 2.0, 0.98)


@pytest.mark.parametrize("option,value", [("--atk_succ_threshold", "98"), ("--mask_rounds", "0"),
                                          ("--init_cost", "0"), ("--cost_multiplier", "1"),
                                          ("--unlearning_ratio", "0"), ("--epochs", "-1")])
def test_bad_options_are_clear_errors(option, value):
    with pytest.raises(UserError, match=option):
        nc.main(["--result_file", "nowhere", option, value])
