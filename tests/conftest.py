"""Shared test fixtures. Tests import the project from the repository root (pytest runs from there)."""
import shutil
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
SHARED_RECORDS = SHARED / "records"
CIFAR10_DIR = REPO_ROOT / "data" / "cifar10"

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture
def shared_record(tmp_path):
    """Copy a shared BackdoorBench record into tmp_path/record/ (never touch ../shared) and return that folder."""
    def copy(name):
        source = SHARED_RECORDS / name
        if not (source / "attack_result.pt").is_file():
            pytest.fail(f"shared record {source} is missing: tests need ../shared beside the repository")
        target = tmp_path / "record" / name
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("defense"))
        return target
    return copy


@pytest.fixture
def cifar10_dir():
    """The prepared CIFAR-10 copy (python ../shared/data/prepare_cifar10.py data/cifar10; .ci/run does it)."""
    if not (CIFAR10_DIR / "cifar-10-batches-py" / "data_batch_1").is_file():
        pytest.fail("data/cifar10 is missing: run python ../shared/data/prepare_cifar10.py data/cifar10")
    return CIFAR10_DIR
