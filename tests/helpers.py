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
