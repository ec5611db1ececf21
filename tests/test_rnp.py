"""RNP (defense/rnp.py): options, unlearning's stopping rule, mask recovery, the no-BatchNorm error, and end to end
on the shared record."""
import json
import types

import pandas as pd
import pytest
import torch
import torch.nn as nn

import utils.defense_run as defense_run
from conftest import SHARED_RECORDS
from helpers import EVAL_LIMIT, load_script, run_defense_on_shared_record
from fakes import fake_run, small_data, tiny
from utils.defense_setup import defense_defaults, parse_defense_args
from utils.errors import UserError, run_cli
from utils.models import build_model, load_weights
from utils.pruning import BatchNormMasks
from utils.records import load_attack_record
from utils.tensor_data import Augmentation, DeviceImages
from utils.training import EvalSets

rnp = load_script("defense/rnp.py")
DEFAULTS = defense_defaults(rnp.build_parser(), "rnp")  # what a run starts from: the YAML


def test_defaults_are_the_reference_values_from_the_yaml():
    args = parse_defense_args(rnp.build_parser(), ["--result_file", "x", "--yaml_path",
                                                      "config/defense/rnp/cifar10.yaml"], "rnp")
    assert (args.ratio, args.batch_size, args.unlearning_lr, args.unlearning_epochs, args.schedule,
            args.clean_threshold, args.recovering_lr, args.recovering_epochs, args.alpha) == (
        0.01, 128, 0.01, 20, [10, 20], 0.2, 0.2, 20, 0.2)
    assert (args.pruning_by, args.pruning_number, args.acc_tolerance, args.sweep, args.prune_bias) == (
        "threshold", 0.2, None, False, False)
    assert parse_defense_args(rnp.build_parser(), ["--result_file", "x", "--acc_tolerance", "0.03"],
                              "rnp").acc_tolerance == 0.03


@pytest.mark.parametrize("extra, message", [
    (["--unlearning_epochs", "-1"], "--unlearning_epochs"),
    (["--recovering_lr", "0"], "--recovering_lr"),
    (["--clean_threshold", "1.5"], "--clean_threshold"),
    (["--pruning_by", "number"], "whole --pruning_number"),
])
def test_bad_options_are_clear_errors(extra, message):
    with pytest.raises(UserError, match=message):
        rnp.main(["--result_file", "nowhere", *extra])


def options(**changes):
    return dict({"unlearning_epochs": 3, "recovering_epochs": 2}, **changes)


def test_unlearning_stops_after_the_first_epoch_at_or_below_the_threshold():
    first = rnp.unlearn(fake_run(DEFAULTS, **options(clean_threshold=1.0)), tiny(), small_data())
    assert len(first) == 1  # any accuracy is <= 1
    model = tiny()
    before = [p.detach().clone() for p in model.parameters()]
    rows = rnp.unlearn(fake_run(DEFAULTS, **options(clean_threshold=-1.0)), model, small_data())  # never met
    assert len(rows) == 3
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_recovering_learns_only_the_masks_within_0_and_1():
    model = tiny()
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    run = fake_run(DEFAULTS, **options(recovering_lr=5.0))
    with BatchNormMasks(model, "RNP") as masks:
        rows = rnp.recover(run, model, masks, small_data())
        values = masks.values()["bn"]
    assert len(rows) == 2 and run.counted["recover"] == 2 * 24
    assert all(torch.equal(weights[name], p) for name, p in model.named_parameters())
    assert values.shape == (4,) and not torch.equal(values, torch.ones(4))
    assert float(values.min()) >= 0 and float(values.max()) <= 1


def test_a_model_without_batchnorm_fails_with_one_message_and_no_output(tmp_path, monkeypatch, capsys):
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3))
    record = types.SimpleNamespace(folder=tmp_path / "plain", name="plain", model_name="vgg11", num_classes=3)
    data = small_data(8)
    bd = DeviceImages(data.images.numpy(), [0] * 8, "cpu", (0.5,) * 3, (0.25,) * 3, original=[1] * 8)

    def prepare(args, check_model=None):
        if check_model is not None:  # the frame's check of the model, before any data is read
            check_model(model, record, args)
        return types.SimpleNamespace(args=args, record=record, device=torch.device("cpu"), model=model, notes=[],
                                     clean_indices=list(range(8)), clean_subset=data, seconds={},
                                     augmentation=Augmentation(), eval_sets=EvalSets(data, bd),
                                     precision="precision: float32 (--amp false)")
    monkeypatch.setattr(defense_run, "prepare_defense", prepare)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(rnp.main, ["--result_file", "plain", "--progress", "False"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: RNP masks and prunes BatchNorm channels")
    assert not (tmp_path / "plain" / "defense" / "rnp").exists()
    defense_folder = tmp_path / "plain" / "defense"
    assert not defense_folder.exists() or not any(path.name.startswith(".rnp") for path in defense_folder.iterdir())


# ---------------------------------------------------------------- end to end on the shared BackdoorBench record

@pytest.fixture(scope="module")
def rnp_run(tmp_path_factory):
    return run_defense_on_shared_record(
        tmp_path_factory.mktemp("rnp"), "defense/rnp.py", "config/defense/rnp/cifar10.yaml",
        "--unlearning_epochs", 1, "--recovering_epochs", 1, "--acc_tolerance", 0.05,
        "--pruning_max", 0.9, "--pruning_step", 0.3)


def test_rnp_end_to_end_prunes_exactly_the_low_mask_channels_of_the_original(rnp_run):
    folder, result = rnp_run
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "RNP: ACC" in result.stdout
    summary = json.loads((folder / "summary.json").read_text())
    decision = summary["pruning"]
    assert summary["defense"] == "rnp" and summary["clean_samples"] == 500 and summary["eval_limit"] == EVAL_LIMIT
    assert summary["unlearning_epochs_run"] == 1 and summary["mask_samples"] == 400
    assert decision["rule"] == "acc_tolerance" and decision["holdout_samples"] == 100
    assert decision["pruning_amount"] in (0.0, 0.3, 0.6, 0.9)
    assert decision["holdout_acc_chosen"] >= decision["holdout_acc_unpruned"] - 0.05
    assert summary["images"]["unlearn"] == summary["images"]["recover"] == 400
    assert all(summary["seconds"][phase] > 0 for phase in ("unlearn", "recover", "prune"))
    for stem in ("unlearn_df", "recover_df"):
        assert len(pd.read_csv(folder / f"{stem}.csv")) == 1

    masks = pd.read_csv(folder / "mask_values.csv")
    assert list(masks.columns) == ["layer", "channel", "mask", "pruned"]
    assert len(masks) == decision["total_channels"] == 3392  # the channels of PreAct-ResNet18's 16 BatchNorm layers
    assert masks["mask"].between(0, 1).all() and (masks["mask"] < 1).any()  # recovery moved the masks
    assert masks["pruned"].sum() == decision["pruned_channels"]
    assert (masks["pruned"] == (masks["mask"].astype("float32") <= decision["pruning_amount"])).all()

    saved = load_weights(build_model("preactresnet18", 10), torch.load(folder / "defense_result.pt",
                                                                       weights_only=True)["model"]).state_dict()
    original = load_attack_record("badnet_0_1", SHARED_RECORDS).state_dict
    pruned = {(row.layer, row.channel) for row in masks[masks["pruned"]].itertuples()}
    for key, value in saved.items():
        layer, _, kind = key.rpartition(".")
        expected = original[key].clone()
        if kind == "weight" and layer in set(masks["layer"]):
            expected[[c for (name, c) in pruned if name == layer]] = 0
        assert torch.equal(value, expected.to(value.dtype)), key  # the pruned scales, nothing else, changed
