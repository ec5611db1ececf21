"""FT (defense/ft.py), BackdoorBench's fine-tuning baseline: options, and end to end on the shared record."""
import json

import pandas as pd
import pytest
import torch

from helpers import EVAL_LIMIT, load_script, run_defense_on_shared_record
from utils.defense_setup import parse_defense_args
from utils.errors import UserError
from utils.models import build_model, load_weights

ft = load_script("defense/ft.py")


def test_defaults_are_backdoorbenchs_from_the_yaml():
    args = parse_defense_args(ft.build_parser(), ["--result_file", "x", "--yaml_path",
                                                     "config/defense/ft/cifar10.yaml"], "ft")
    assert (args.ratio, args.batch_size, args.epochs, args.lr, args.sgd_momentum, args.wd, args.lr_scheduler) == (
        0.05, 256, 100, 0.01, 0.9, 0.0005, "CosineAnnealingLR")
    assert parse_defense_args(ft.build_parser(), ["--result_file", "x", "--epochs", "7"], "ft").epochs == 7


def test_negative_epochs_is_a_clear_error():
    with pytest.raises(UserError, match="--epochs"):
        ft.main(["--result_file", "nowhere", "--epochs", "-1"])


@pytest.fixture(scope="module")
def ft_run(tmp_path_factory):
    return run_defense_on_shared_record(tmp_path_factory.mktemp("ft"), "defense/ft.py", "config/defense/ft/cifar10.yaml",
                                        "--epochs", 2, "--ratio", 0.005)


def test_ft_end_to_end_changes_the_model_and_reports(ft_run):
    folder, result = ft_run
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["defense"] == "ft" and summary["clean_samples"] == 250 and summary["eval_limit"] == EVAL_LIMIT
    assert summary["images"]["finetune"] == 2 * 250 and summary["images"]["evaluate_before"] == 2 * EVAL_LIMIT
    table = pd.read_csv(folder / "ft_df.csv", index_col=0)
    assert len(table) == 2 and table["test_acc"].iloc[-1] == pytest.approx(summary["after"]["test_acc"])
    assert any(line.startswith("FT: ACC") or "FT: ACC" in line for line in result.stdout.splitlines())
    saved = torch.load(folder / "defense_result.pt", weights_only=True)
    model = load_weights(build_model("preactresnet18", 10), saved["model"])
    from conftest import SHARED_RECORDS
    from utils.records import load_attack_record
    original = load_attack_record("badnet_0_1", SHARED_RECORDS).state_dict
    changed = [key for key, value in model.state_dict().items()
               if value.is_floating_point() and not torch.equal(value, original[key].to(value.dtype))]
    assert len(changed) > 50  # every layer was fine-tuned
