"""The frame every defense runs in (utils/defense_run.py): per-epoch rows, phases, --eval_limit."""
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
