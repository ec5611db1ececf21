"""sh/fuzz_records.py: a small sampled run over every mutation family, and proof that its classifier sees harm."""
import contextlib

import pytest

from helpers import load_script

fuzz_records = load_script("sh/fuzz_records.py")


def test_every_family_gives_a_clean_error_or_the_original_content():
    families = fuzz_records.FAMILIES
    counts, failures = fuzz_records.fuzz(3 * len(fuzz_records.MUTATIONS), seed=11, timeout=30, echo=lambda _: None)
    assert not failures, failures[:5]
    assert {family for family, _ in counts} == set(families)  # each family ran at least once
    assert sum(counts.values()) == 3 * len(fuzz_records.MUTATIONS)
    assert counts["benign", "ok"] >= 1 and counts["pickle_payload", "clean error"] >= 1


def test_the_classifier_sees_code_run_when_the_torchscript_guard_is_off(monkeypatch):
    """With both TorchScript locks removed, the fuzzer must report code executed: the oracle is real."""
    from utils import safe_pickle
    monkeypatch.setattr(safe_pickle, "check_torch_archive", lambda *args, **kwargs: None)
    monkeypatch.setattr(safe_pickle, "_torchscript_unreachable", lambda *args: contextlib.nullcontext())
    counts, failures = fuzz_records.fuzz(4, seed=1, families=["torchscript"], timeout=30, echo=lambda _: None)
    assert counts["torchscript", "code executed"] == 4, counts


def test_the_classifier_sees_garbage_accepted_when_a_check_is_off(monkeypatch):
    from utils import records
    monkeypatch.setattr(records.PoisonedSplit, "check_labels", lambda *args: None)
    monkeypatch.setattr(records, "check_bounded", lambda *args, **kwargs: None)
    counts, failures = fuzz_records.fuzz(12, seed=2, families=["labels"], timeout=30, echo=lambda _: None)
    assert counts["labels", "accepted garbage"] + counts["labels", "traceback"] >= 1, counts


@pytest.mark.parametrize("outcome, code, stderr", [
    ("clean error", 2, "error: something is off\n"),
    ("traceback", 2, "error: one\nerror: two\n"),
    ("traceback", 1, "Traceback (most recent call last):\n"),
    ("hang", "hang", ""),
])
def test_classify(tmp_path, outcome, code, stderr):
    assert fuzz_records.classify(code, "", stderr, tmp_path, "digest", "wrong") == outcome


def test_classify_loaded_content():
    from pathlib import Path
    folder = Path("/nonexistent")
    assert fuzz_records.classify(0, "DIGEST abc\n", "", folder, "abc", "wrong") == "ok"
    assert fuzz_records.classify(0, "DIGEST abd\n", "", folder, "abc", "wrong") == "accepted garbage"
    assert fuzz_records.classify(0, "DIGEST abd\n", "", folder, "abc", "valid") == "ok"
    assert fuzz_records.classify(0, "CODE_RAN\nDIGEST abc\n", "", folder, "abc", "wrong") == "code executed"
