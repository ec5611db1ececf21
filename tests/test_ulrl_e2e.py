"""ULRL end to end on a real BackdoorBench record (../shared/records), on CPU, with reduced epochs."""
import json

import pandas as pd
import pytest
import torch

from helpers import EVAL_LIMIT, run_script
from utils.models import build_model, load_weights
from utils.reporting import EPOCH_COLUMNS

# BackdoorBench's own evaluation of this record (its attack_df.csv): full-precision evaluation must match it.
BADNET_BEFORE = {"test_acc": 0.5356, "test_asr": 0.1351111111111111, "test_ra": 0.5237777777777778}




@pytest.fixture(scope="module")
def ulrl_run(tmp_path_factory, request):
    """One reduced ULRL run as a user types it (relative paths from the repository root), at the reference setting
    (1% clean data: BackdoorBench's 500 indices)."""
    import shutil
    from conftest import SHARED_RECORDS, require_cifar10, require_shared_record
    require_cifar10()
    require_shared_record("badnet_0_1")
    record_dir = tmp_path_factory.mktemp("e2e") / "record"
    shutil.copytree(SHARED_RECORDS / "badnet_0_1", record_dir / "badnet_0_1", ignore=shutil.ignore_patterns("defense"))
    result = run_script("defense/ulrl.py", "--result_file", "badnet_0_1", "--yaml_path",
                        "config/defense/ulrl/reference.yaml", "--dataset", "cifar10", "--record_dir", record_dir,
                        "--unlearning_epochs", 1, "--relearn_epochs", 2, "--progress", "False", "--device", "cpu",
                        "--eval_limit", EVAL_LIMIT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return record_dir / "badnet_0_1" / "defense" / "ulrl", result


@pytest.mark.slow
def test_full_evaluation_of_the_record_matches_backdoorbench(tmp_path):
    """Full-precision evaluation of the whole test sets, as every defense does before and after, gives exactly
    BackdoorBench's own numbers for this record (its attack_df.csv)."""
    from conftest import CIFAR10_DIR, SHARED_RECORDS, require_cifar10, require_shared_record
    from utils.defense_setup import defense_parser, parse_defense_args, prepare_defense
    from utils.training import evaluate
    require_cifar10()
    require_shared_record("badnet_0_1")
    args = parse_defense_args(defense_parser("test"), [
        "--result_file", "badnet_0_1", "--record_dir", str(SHARED_RECORDS), "--dataset", "cifar10",
        "--dataset_path", str(CIFAR10_DIR.parent), "--device", "cpu", "--progress", "False"])
    setup = prepare_defense(args)
    assert len(setup.eval_sets.clean_test) == 10000 and len(setup.eval_sets.bd_test) == 9000
    metrics = evaluate(setup.model, setup.eval_sets)
    for metric, value in BADNET_BEFORE.items():
        assert metrics[metric] == pytest.approx(value, abs=1e-9), metric


def test_summary_line_and_before_metrics(ulrl_run):
    folder, result = ulrl_run
    summary = json.loads((folder / "summary.json").read_text())
    line = [text for text in result.stdout.splitlines() if "ULRL: ACC" in text]
    assert line, result.stdout[-2000:]
    assert f"ACC {summary['before']['test_acc']:.4f} -> {summary['after']['test_acc']:.4f}" in line[-1]
    assert "ASR" in line[-1] and "RA" in line[-1] and "DER" in line[-1] and line[-1].rstrip().endswith(" s")
    assert summary["unlearning_epochs_run"] == 1
    for phase in ("load", "evaluate_before", "unlearn", "relearn", "evaluate_after", "total"):
        assert summary["seconds"][phase] > 0
    assert summary["images"]["evaluate_before"] == 2 * EVAL_LIMIT and summary["eval_limit"] == EVAL_LIMIT
    assert summary["peak_memory_mib"] > 0
    assert summary["clean_samples"] == 500
    assert "precision: " in result.stdout  # the policy's choice and its reason, one log line


def test_defense_result_is_a_backdoorbench_model_file(ulrl_run):
    folder, _ = ulrl_run
    saved = torch.load(folder / "defense_result.pt", weights_only=True)
    assert set(saved) == {"model_name", "num_classes", "model"}
    assert saved["model_name"] == "preactresnet18" and saved["num_classes"] == 10
    load_weights(build_model("preactresnet18", 10), saved["model"])


def test_clean_subset_indices_are_backdoorbenchs(ulrl_run):
    folder, _ = ulrl_run
    indices = [int(line) for line in (folder / "index.txt").read_text().split()]
    assert len(indices) == 500 and len(set(indices)) == 500
    assert indices[:5] == [25247, 49673, 27562, 2653, 16968]
    assert (folder / "log" / "index.txt").read_text() == (folder / "index.txt").read_text()


def test_phase_csvs_summaries_and_plots(ulrl_run):
    folder, _ = ulrl_run
    for stem, max_rows in (("unlearn_df", 1), ("relearn_df", 2)):
        table = pd.read_csv(folder / f"{stem}.csv", index_col=0)
        assert list(table.columns) == EPOCH_COLUMNS
        assert 1 <= len(table) <= max_rows
        summary = pd.read_csv(folder / f"{stem}_summary.csv", index_col=0)
        assert list(summary.index) == ["last", "valid_max", "exist_nan_value"]
        for suffix in ("loss_metric", "acc_like_metric"):
            assert (folder / f"{stem}_{suffix}_plots.png").stat().st_size > 1000
    relearn = pd.read_csv(folder / "relearn_df.csv", index_col=0)
    assert pd.api.types.is_float_dtype(relearn["test_acc"])  # epochs not evaluated read back as NaN, not strings
    assert relearn["test_acc"].iloc[:-1].isna().all()
    after = json.loads((folder / "summary.json").read_text())["after"]
    assert relearn["test_acc"].iloc[-1] == pytest.approx(after["test_acc"])


def test_log_names_scores_selection_and_phase_seconds(ulrl_run):
    folder, _ = ulrl_run
    logs = list((folder / "log").glob("*.log"))
    assert len(logs) == 1
    text = logs[0].read_text()
    assert "linear: weight-change scores" in text and "linear: selected neurons" in text
    for phase in ("evaluate_before", "unlearn", "relearn", "evaluate_after"):
        assert f"phase {phase}:" in text
    scores = pd.read_csv(folder / "neuron_scores.csv")
    assert list(scores["neuron"]) == list(range(10)) and (scores["layer"] == "linear").all()
    selected = json.loads((folder / "summary.json").read_text())["selected"]
    assert sorted(scores.loc[scores["selected"], "neuron"]) == selected.get("linear", [])


def test_no_partial_folders_left(ulrl_run):
    folder, _ = ulrl_run
    assert [p.name for p in folder.parent.iterdir()] == ["ulrl"]
