"""Output folders and files survive kills and leftovers: utils.reporting.OutputFolder, write_json, SIGTERM."""
import json
import os
import signal
import subprocess
import sys

import pytest

from utils.errors import run_cli
from utils.reporting import OutputFolder, write_json


def dead_pid():
    """The pid of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_rerun_swaps_the_result_in_and_leaves_nothing_hidden(tmp_path):
    final = tmp_path / "ulrl"
    final.mkdir()
    (final / "summary.json").write_text("old")
    with OutputFolder(final) as out:
        (out.path / "summary.json").write_text("new")
        assert out.path.name.startswith(f".ulrl.partial-{os.getpid()}-")
    assert (final / "summary.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ulrl"]


def test_a_failed_run_keeps_the_earlier_result(tmp_path):
    final = tmp_path / "ulrl"
    final.mkdir()
    (final / "summary.json").write_text("old")
    with pytest.raises(RuntimeError):
        with OutputFolder(final) as out:
            (out.path / "summary.json").write_text("half")
            raise RuntimeError("killed")
    assert (final / "summary.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ulrl"]


def test_leftovers_of_dead_runs_are_removed_but_not_those_of_live_ones(tmp_path):
    dead = tmp_path / f".ulrl.partial-{dead_pid()}-abc"
    live = tmp_path / f".ulrl.partial-{os.getppid()}-xyz"  # the test runner's parent: alive
    dead.mkdir()
    live.mkdir()
    with OutputFolder(tmp_path / "ulrl"):
        pass
    assert not dead.exists() and live.exists()


def test_an_earlier_result_left_aside_by_a_kill_comes_back(tmp_path):
    """A kill between the two renames of the fallback swap leaves the earlier result in .NAME.previous-*."""
    aside = tmp_path / ".ulrl.previous-123"
    aside.mkdir()
    (aside / "summary.json").write_text("old")
    folder = OutputFolder(tmp_path / "ulrl")
    assert (tmp_path / "ulrl" / "summary.json").read_text() == "old" and not aside.exists()
    folder.__exit__(RuntimeError, RuntimeError("stop"), None)


def test_json_is_strict(tmp_path):
    write_json(tmp_path / "summary.json", {"after": {"test_asr": float("nan"), "loss": float("inf")}, "n": [1.5]})
    text = (tmp_path / "summary.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"after": {"test_asr": None, "loss": None}, "n": [1.5]}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_sigterm_is_handled_like_ctrl_c(capsys):
    def main(_argv):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt")
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as stop:
            run_cli(main, [])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stop.value.code == 130 and "interrupted" in capsys.readouterr().err
