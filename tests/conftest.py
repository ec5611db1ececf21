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
            pytest.skip(f"BackdoorBench's shared record {name} is not beside the repository ({source})")
        target = tmp_path / "record" / name
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("defense"))
        return target
    return copy


@pytest.fixture
def cifar10_dir():
    """The prepared CIFAR-10 copy (python ../shared/data/prepare_cifar10.py data/cifar10; .ci/run does it)."""
    require_cifar10()
    return CIFAR10_DIR


def require_cifar10():
    """Skip (with the reason) where the real CIFAR-10 has not been prepared under data/cifar10."""
    if not (CIFAR10_DIR / "cifar-10-batches-py" / "data_batch_1").is_file():
        pytest.skip("data/cifar10 is not prepared (python ../shared/data/prepare_cifar10.py data/cifar10; "
                    ".ci/run does it)")


def require_shared_record(name):
    """Skip (with the reason) where BackdoorBench's shared records are not beside the repository."""
    if not (SHARED_RECORDS / name / "attack_result.pt").is_file():
        pytest.skip(f"BackdoorBench's shared record {name} is not beside the repository ({SHARED_RECORDS})")
