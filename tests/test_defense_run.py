"""The frame every defense runs in (utils/defense_run.py): per-epoch rows, phases, --eval_limit."""
import logging
import types

import pytest

import utils.defense_run as defense_run
from utils.defense_setup import defense_parser, parse_defense_args
from utils.errors import UserError


def _run(eval_every):
    args = types.SimpleNamespace(eval_every=eval_every, eval_batch_size=8, progress=False, random_seed=0)
    setup = types.SimpleNamespace(args=args, device="cpu", eval_sets=None, seconds={"load": 1.5})
    return defense_run.DefenseRun(setup, folder=None, logger=None, defense="test")


def test_eval_every_evaluates_only_the_asked_epochs(monkeypatch):
    calls = []
    monkeypatch.setattr(defense_run, "evaluate", lambda *a, **k: calls.append(1) or {"test_acc": 0.5})
    stats = types.SimpleNamespace(batches=4, loss=1.0, acc=0.3)
    for every, evaluated in ((0, []), (2, [1, 3]), (1, [0, 1, 2, 3])):
        run = _run(every)
        rows = [run.epoch_row(epoch, stats, model=None) for epoch in range(4)]
        assert [row["epoch"] for row in rows if "test_acc" in row] == evaluated
        assert rows[0]["train_acc"] == 0.3 and rows[0]["batch"] == 4
    assert len(calls) == 2 + 4
    assert "test_acc" in _run(0).epoch_row(0, stats, None, force_eval=True)


def test_one_call_per_epoch_adds_the_row_counts_the_images_and_logs_the_line(monkeypatch, caplog):
    monkeypatch.setattr(defense_run, "evaluate", lambda *a, **k: {"test_acc": 0.5, "test_asr": 0.25})
    run = _run(2)
    run.logger = logging.getLogger("test_defense_run")
    run.setup.eval_sets = types.SimpleNamespace(images=lambda: 30)
    stats = types.SimpleNamespace(batches=4, loss=1.0, acc=0.3, samples=8)
    rows = []
    with caplog.at_level(logging.INFO, logger="test_defense_run"):
        run.end_epoch(rows, "train", 0, stats, None, "epoch 0")
        run.end_epoch(rows, "train", 1, stats, None, "epoch 1", images=3 * stats.samples)  # evaluated: --eval_every
        run.end_epoch(rows, "train", 2, stats, None)
    assert [row["epoch"] for row in rows] == [0, 1, 2] and "test_acc" in rows[1] and "test_acc" not in rows[0]
    assert run.images["train"] == 8 + (24 + 30) + 8
    assert caplog.messages == ["epoch 0", "epoch 1, test_acc 0.5000, test_asr 0.2500"]


def test_phases_accumulate_seconds_and_images():
    run = _run(0)
    for _ in range(2):
        with run.phase("prune"):
            run.count_images("prune", 10)
    assert run.seconds["load"] == 1.5 and run.seconds["prune"] > 0
    assert run.images["prune"] == 20


def test_phase_is_timed_even_when_it_fails():
    run = _run(0)
    with pytest.raises(RuntimeError):
        with run.phase("broken"):
            raise RuntimeError("boom")
    assert "broken" in run.seconds


def test_eval_limit_must_not_be_negative():
    with pytest.raises(UserError, match="eval_limit"):
        parse_defense_args(defense_parser("t"), ["--result_file", "x", "--eval_limit", "-1"])
    args = parse_defense_args(defense_parser("t"), ["--result_file", "x"])
    assert args.eval_limit == 0
