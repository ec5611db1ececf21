"""ULRL end to end on a real BackdoorBench record (../shared/records), on CPU, with reduced epochs."""
import json

import pandas as pd
import pytest
import torch

from helpers import run_script
from utils.models import build_model, load_weights
from utils.reporting import EPOCH_COLUMNS

# BackdoorBench's own evaluation of this record (its attack_df.csv): full-precision evaluation must match it.
BADNET_BEFORE = {"test_acc": 0.5356, "test_asr": 0.1351111111111111, "test_ra": 0.5237777777777778}


@pytest.fixture(scope="module")
def ulrl_run(tmp_path_factory, request):
    """One reduced ULRL run as a user types it (relative paths from the repository root)."""
    import shutil
    from conftest import CIFAR10_DIR, SHARED_RECORDS
    if not (CIFAR10_DIR / "cifar-10-batches-py" / "data_batch_1").is_file():
        pytest.fail("data/cifar10 is missing: run python ../shared/data/prepare_cifar10.py data/cifar10")
    record_dir = tmp_path_factory.mktemp("e2e") / "record"
    shutil.copytree(SHARED_RECORDS / "badnet_0_1", record_dir / "badnet_0_1", ignore=shutil.ignore_patterns("defense"))
    result = run_script("defense/ulrl.py", "--result_file", "badnet_0_1", "--yaml_path",
                        "config/defense/ulrl/cifar10.yaml", "--dataset", "cifar10", "--record_dir", record_dir,
                        "--unlearning_epochs", 2, "--relearn_epochs", 2, "--progress", "False", "--device", "cpu")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return record_dir / "badnet_0_1" / "defense" / "ulrl", result


def test_summary_line_and_before_metrics_match_backdoorbench(ulrl_run):
    folder, result = ulrl_run
    summary = json.loads((folder / "summary.json").read_text())
    for metric, value in BADNET_BEFORE.items():
        assert summary["before"][metric] == pytest.approx(value, abs=1e-9), metric
    line = [text for text in result.stdout.splitlines() if "ULRL: ACC" in text]
    assert line, result.stdout[-2000:]
    assert f"ACC {BADNET_BEFORE['test_acc']:.4f} -> {summary['after']['test_acc']:.4f}" in line[-1]
    assert "ASR" in line[-1] and "RA" in line[-1] and "DER" in line[-1] and line[-1].rstrip().endswith(" s")
    assert summary["unlearning_epochs_run"] <= 2
    for phase in ("load", "evaluate_before", "unlearn", "relearn", "evaluate_after", "total"):
        assert summary["seconds"][phase] > 0
    assert summary["images"]["evaluate_before"] == 10000 + 9000
    assert summary["peak_memory_mib"] > 0
    assert summary["clean_samples"] == 500


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
    for stem, max_rows in (("unlearn_df", 2), ("relearn_df", 2)):
        table = pd.read_csv(folder / f"{stem}.csv", index_col=0, na_values=["nan_value"])
        assert list(table.columns) == EPOCH_COLUMNS
        assert 1 <= len(table) <= max_rows
        summary = pd.read_csv(folder / f"{stem}_summary.csv", index_col=0)
        assert list(summary.index) == ["last", "valid_max", "exist_nan_value"]
        for suffix in ("loss_metric", "acc_like_metric"):
            assert (folder / f"{stem}_{suffix}_plots.png").stat().st_size > 1000
    relearn = pd.read_csv(folder / "relearn_df.csv", index_col=0, na_values=["nan_value"])
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
