"""Bad input to defense/ulrl.py: one clear message, exit status 2, nothing on disk lost or half-written."""
import shutil

import pytest

from conftest import SHARED_RECORDS
from helpers import load_script, run_script
from utils.errors import UserError


@pytest.fixture
def record_dir(tmp_path):
    """A copy of the shared badnet record under tmp_path/record, with a previous ULRL result to protect."""
    target = tmp_path / "record" / "badnet_0_1"
    shutil.copytree(SHARED_RECORDS / "badnet_0_1", target, ignore=shutil.ignore_patterns("defense"))
    previous = target / "defense" / "ulrl"
    previous.mkdir(parents=True)
    (previous / "defense_result.pt").write_bytes(b"earlier result")
    return tmp_path / "record"


def _fails_cleanly(result, *expected):
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for text in expected:
        assert text in error_lines[0], error_lines[0]


def _previous_result_intact(record_dir):
    defense = record_dir / "badnet_0_1" / "defense"
    assert sorted(p.name for p in defense.iterdir()) == ["ulrl"]
    assert (defense / "ulrl" / "defense_result.pt").read_bytes() == b"earlier result"


@pytest.mark.parametrize("extra,expected", [
    (["--result_file", "no_such_record"], ["attack record not found", "no_such_record/attack_result.pt"]),
    (["--dataset", "cifar100"], ["made on cifar10", "cifar100"]),
    (["--model", "vgg19_bn"], ["--model vgg19_bn does not match", "preactresnet18"]),
    (["--dataset_path", "nowhere"], ["cifar10 data not found", "nowhere/cifar10/cifar-10-batches-py"]),
    (["--yaml_path", "config/defense/ulrl/nope.yaml"], ["config file not found"]),
    (["--ratio", "0"], ["--ratio must be in (0, 1]"]),
    (["--device", "cuda:7"] if not __import__("torch").cuda.is_available() else ["--device", "tpu"], ["device"]),
    (["--index", "missing_index.txt"], ["cannot read index file"]),
])
def test_bad_input_gives_one_message(record_dir, extra, expected):
    args = ["--result_file", "badnet_0_1", "--record_dir", record_dir, "--progress", "False"]
    result = run_script("defense/ulrl.py", *args, *extra, timeout=300)
    _fails_cleanly(result, *expected)
    _previous_result_intact(record_dir)


def test_bad_boolean_is_refused(record_dir):
    result = run_script("defense/ulrl.py", "--result_file", "badnet_0_1", "--record_dir", record_dir,
                        "--init", "maybe", timeout=120)
    assert result.returncode == 2 and "expected a boolean" in result.stderr
    _previous_result_intact(record_dir)


def test_corrupt_record_is_refused(record_dir):
    record = record_dir / "badnet_0_1" / "attack_result.pt"
    record.write_bytes(record.read_bytes()[:5000])
    result = run_script("defense/ulrl.py", "--result_file", "badnet_0_1", "--record_dir", record_dir, timeout=120)
    _fails_cleanly(result, "corrupt")
    _previous_result_intact(record_dir)


def test_missing_poisoned_images_are_named(record_dir):
    shutil.rmtree(record_dir / "badnet_0_1" / "bd_test_dataset")
    # from a folder where the record's relative paths (./record/badnet_0_1/...) do not resolve either
    result = run_script("defense/ulrl.py", "--result_file", "badnet_0_1", "--record_dir", record_dir,
                        timeout=120, cwd=record_dir.parent)
    _fails_cleanly(result, "poisoned images of bd_test not found")
    _previous_result_intact(record_dir)


def test_failure_mid_run_leaves_no_partial_folder(record_dir, monkeypatch):
    """A crash after outputs were started (here: in relearning) removes them and keeps the earlier result."""
    ulrl = load_script("defense/ulrl.py")

    def crash(*args, **kwargs):
        raise UserError("simulated failure while relearning")

    monkeypatch.setattr(ulrl, "relearn", crash)
    import utils.defense_run
    monkeypatch.setattr(utils.defense_run, "evaluate",
                        lambda *a, **k: {"test_acc": 0.0, "test_asr": 0.0, "test_ra": 0.0})
    with pytest.raises(UserError, match="simulated failure"):
        ulrl.main(["--result_file", "badnet_0_1", "--record_dir", str(record_dir), "--unlearning_epochs", "1",
                   "--ratio", "0.002", "--progress", "False", "--device", "cpu"])
    _previous_result_intact(record_dir)
