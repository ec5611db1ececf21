"""Helpers for tests: import a script by path, run a script as a user would."""
import importlib.util
import subprocess
import sys

from conftest import REPO_ROOT
from utils.synthetic import write_synthetic_cifar10  # noqa: F401  (tests import it from here)


def load_script(relative_path):
    """Import a runnable script (e.g. defense/ulrl.py) as a module."""
    path = REPO_ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.stem + "_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(relative_path, *args, timeout=1200, cwd=REPO_ROOT):
    """Run `python <script> args...` (from the repository root by default); returns the CompletedProcess."""
    return subprocess.run([sys.executable, str(REPO_ROOT / relative_path), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


EVAL_LIMIT = 200  # test images of each set in the end-to-end runs (PreAct-ResNet18 evaluates ~100 images/s on 2 cores)


def run_defense_on_shared_record(record_parent, script, yaml_path, *extra, record="badnet_0_1",
                                 eval_limit=EVAL_LIMIT):
    """Run a defense script as a user would on a copy of a shared BackdoorBench record (under record_parent/record),
    on CPU, evaluating only the first `eval_limit` test images of each set. Returns (output folder, result)."""
    import shutil

    from conftest import SHARED_RECORDS, require_cifar10, require_shared_record
    require_cifar10()
    require_shared_record(record)
    record_dir = record_parent / "record"
    if not (record_dir / record).exists():
        shutil.copytree(SHARED_RECORDS / record, record_dir / record, ignore=shutil.ignore_patterns("defense"))
    defense = relative_stem(script)
    result = run_script(script, "--result_file", record, "--yaml_path", yaml_path, "--dataset", "cifar10",
                        "--record_dir", record_dir, "--eval_limit", eval_limit, "--progress", "False",
                        "--device", "cpu", *extra)
    return record_dir / record / "defense" / defense, result


def relative_stem(script):
    """defense/ft.py -> ft"""
    return script.rsplit("/", 1)[-1].removesuffix(".py")


def build_for_shapes(name, num_classes=10):
    """A registered model for tests that need only its structure and shapes: built on the meta device (no weight
    initialisation, seconds saved for VGG/ViT) where its constructor allows, else on the CPU."""
    import torch

    from utils.models import build_model
    try:
        with torch.device("meta"):
            return build_model(name, num_classes)
    except NotImplementedError:  # regnet computes its widths with tensors
        return build_model(name, num_classes)
