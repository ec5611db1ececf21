"""The labelled test-set sweep (utils/selection.LabelledSweep): test metrics into each setting's row, the images
counted under the sweep's phase, one log line per model and the CSV with its note. The hold-out split and the
tolerance rules are tested with their users (tests/test_pruning.py, tests/test_tsbd.py)."""
import logging
from types import SimpleNamespace

import pandas as pd

from fakes import fake_run
from utils.selection import LabelledSweep, sweep_help


def test_each_measured_model_adds_its_test_metrics_to_its_row_and_the_rows_go_to_one_csv(tmp_path, caplog):
    run = fake_run({})
    run.path = tmp_path
    run.setup.eval_sets = SimpleNamespace(images=lambda: 30)
    run.evaluate = lambda model: {"test_acc": model / 10, "test_asr": 0.5, "test_ra": 0.25}
    sweep = LabelledSweep(run, "sweep", "grid.csv", "amount")
    with caplog.at_level(logging.INFO, logger="test"):
        rows = [sweep.measure(model, {"amount": model}, f"sweep amount {model}") for model in (1, 2)]
        sweep.write(rows)
    assert rows == [{"amount": 1, "test_acc": 0.1, "test_asr": 0.5, "test_ra": 0.25},
                    {"amount": 2, "test_acc": 0.2, "test_asr": 0.5, "test_ra": 0.25}]
    assert run.counted == {"sweep": 60}
    assert pd.read_csv(tmp_path / "grid.csv").to_dict("records") == rows
    lines = caplog.messages
    assert lines[0] == "sweep amount 1: test ACC 0.1000, ASR 0.5000, RA 0.2500"
    assert "grid.csv holds TEST-set metrics per amount" in lines[-1] and "chosen without them" in lines[-1]


def test_the_help_says_the_sweep_reads_the_test_sets():
    assert sweep_help("x.csv").startswith("ANALYSIS ONLY, READS THE TEST SETS: x.csv")
