"""The toolkit from Python (a notebook, your own script), beside the command line, which stays the BackdoorBench-style
front. Nothing is written unless you ask for it.

    import sys; sys.path.insert(0, "path/to/this/repository")
    from defense_api import defend, defend_own_model, load_record

    result = defend("ulrl", "badnet_0_1", options={"ratio": 0.05, "device": "cpu"})
    result.model, result.before, result.after, result.summary["der"]

    result = defend_own_model("ft", model="my_nets.py:Net", weights="my_cnn.pth", mean=[0.5] * 3, std=[0.5] * 3,
                              clean_data="~/my_images", trigger="badnet", target=0, options={"epochs": 5})

Options are the defense's command-line options by name (`{"epochs": 5, "skip_layers": ["shortcut"]}`); everything
else comes from config/defense/<name>/config.yaml (and `yaml_path`, e.g. its cifar10.yaml), as on the command line.
"""
import importlib.util
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent
if str(REPO_ROOT) not in sys.path:  # the defense scripts import utils from the repository root
    sys.path.insert(0, str(REPO_ROOT))

from utils.catalog import DEFENSES  # noqa: E402
from utils.config import read_yaml  # noqa: E402
from utils.defense_run import DefenseResult, defend_with  # noqa: E402
from utils.defense_setup import parse_defense_args  # noqa: E402
from utils.own_record import make_own_record  # noqa: E402
from utils.records import load_attack_record  # noqa: E402

__all__ = ["DefenseResult", "defend", "defend_own_model", "load_record", "make_record", "defense_script"]


def defense_script(name):
    """The module of defense/<name>.py (its build_parser, defend and check_args)."""
    DEFENSES.lookup(name)
    path = REPO_ROOT / "defense" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"defense_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def option_argv(options):
    """{"epochs": 5, "amp": False, "skip_layers": ["a", "b"]} -> ["--epochs", "5", "--amp", "false", ...]."""
    argv = []
    for key, value in (options or {}).items():
        if value is None:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        argv += [f"--{key}"] + [str(v).lower() if isinstance(v, bool) else str(v) for v in values]
    return argv


def _default(path, key):
    """A default from the YAML the command line reads it from (defaults live in YAML only)."""
    return read_yaml(REPO_ROOT / path)[key]


def load_record(record, record_dir=None, trust=False):
    """An attack record (a folder name under record_dir, or a folder path), read without running code."""
    record_dir = record_dir or _default("config/defense/common.yaml", "record_dir")
    return load_attack_record(record, record_dir, trust=trust)


def defend(defense, record, model=None, options=None, save=False, record_dir=None):
    """Run `defense` on `record` and return a DefenseResult (defended model, metrics before and after, summary).
    `model`: the record's model spec, required for a record of your own model (it runs your code); `save`: keep the
    outputs under <record>/defense/<defense>/ as the command line does (default: nothing is written)."""
    script = defense_script(defense)
    argv = ["--result_file", str(record), "--progress", "false"]
    argv += ["--record_dir", str(record_dir)] if record_dir else []
    argv += ["--model", model] if model else []
    args = parse_defense_args(script.build_parser(), argv + option_argv(options), defense)
    if getattr(script, "check_args", None) is not None:
        script.check_args(args)
    return defend_with(args, defense, script.defend, keep_files=save)


def make_record(folder, **pieces):
    """Write a record of your own model (utils.own_record.make_own_record: model, weights or model_file with
    trust_model_file, mean, std, clean_data, img_size, trigger_name or poisoned_folder, target) to `folder`.
    Returns (folder, the model spec a defense's `model` must name)."""
    return make_own_record(folder, **pieces)


def defend_own_model(defense, *, model=None, weights=None, model_file=None, trust_model_file=False, mean=None,
                     std=None, clean_data, trigger=None, poisoned_folder=None, target, img_size=None, options=None,
                     dataset_path=None):
    """Your own model, data and trigger straight into `defense`: the record is built in a temporary folder and
    removed with everything the defense wrote; returns the DefenseResult."""
    dataset_path = dataset_path or _default("config/own_model/config.yaml", "dataset_path")
    with tempfile.TemporaryDirectory(prefix="own-record-") as scratch:
        folder, spec = make_own_record(Path(scratch) / "own_model", model=model, weights=weights,
                                       model_file=model_file, trust_model_file=trust_model_file,
                                       clean_data=clean_data, mean=mean, std=std, img_size=img_size,
                                       trigger_name=trigger, poisoned_folder=poisoned_folder, target=target,
                                       dataset_path=dataset_path, log=lambda _line: None)
        options = {"dataset_path": dataset_path, **(options or {})}
        return defend(defense, folder, model=spec, options=options, record_dir=scratch)
