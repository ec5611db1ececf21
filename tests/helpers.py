"""Helpers for tests: import a script by path, run a script as a user would."""
import importlib.util
import subprocess
import sys

from conftest import REPO_ROOT


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


def write_synthetic_cifar10(folder, train_per_batch=40, test_count=60, seed=0):
    """A small CIFAR-10 in the official layout (cifar-10-batches-py/, five training batches and test_batch).
    Returns (train images NHWC, train labels, test images, test labels)."""
    import pickle

    import numpy as np
    rng = np.random.default_rng(seed)
    root = folder / "cifar-10-batches-py"
    root.mkdir(parents=True)
    arrays = []
    for name, count in [(f"data_batch_{i}", train_per_batch) for i in range(1, 6)] + [("test_batch", test_count)]:
        data = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
        labels = (np.arange(count) + len(arrays)) % 10
        with open(root / name, "wb") as handle:
            pickle.dump({"batch_label": name, "labels": [int(x) for x in labels], "data": data,
                         "filenames": [f"{name}_{i}.png" for i in range(count)]}, handle, protocol=2)
        arrays.append((data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels))
    train_x = np.concatenate([a[0] for a in arrays[:5]])
    train_y = np.concatenate([a[1] for a in arrays[:5]])
    return train_x, train_y, arrays[5][0], arrays[5][1]


def run_defense_on_shared_record(record_parent, script, yaml_path, *extra, record="badnet_0_1", eval_limit=500):
    """Run a defense script as a user would on a copy of a shared BackdoorBench record (under record_parent/record),
    on CPU, evaluating only the first `eval_limit` test images of each set. Returns (output folder, result)."""
    import shutil

    from conftest import CIFAR10_DIR, SHARED_RECORDS
    if not (CIFAR10_DIR / "cifar-10-batches-py" / "data_batch_1").is_file():
        raise AssertionError("data/cifar10 is missing: run python ../shared/data/prepare_cifar10.py data/cifar10")
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
