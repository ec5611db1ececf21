"""The contract every defense script keeps, checked over every defense/<name>.py: options from YAML only, --help,
one clear error for a bad option, and a whole run in-process on a tiny synthetic record (an untrained airbench_cpu
on 200 random CIFAR-10-shaped images), with the outputs every defense writes."""
import json
import shutil

import pandas as pd
import pytest
import torch

from helpers import load_script
from utils.catalog import DEFENSES as REGISTERED
from utils.config import read_yaml
from utils.defense_setup import DEFENSE_CONFIGS, defense_defaults, parse_defense_args
from utils.errors import run_cli
from utils.models import build_model, load_weights
from utils.synthetic import write_synthetic_cifar10, write_tiny_record

DEFENSES = sorted(REGISTERED)
# options that make each defense's run take seconds on the tiny record (everything else: its YAML defaults)
QUICK = {
    "anp": ["--nb_iter", "4", "--print_every", "2"],
    "clp": [],
    "fst": ["--epochs", "1"],
    "ibau": ["--n_rounds", "1", "--K", "2"],
    "fp": ["--epochs", "1"],
    "ft": ["--epochs", "1"],
    "nad": ["--te_epochs", "1", "--epochs", "1", "--layer_names", "auto"],  # airbench_cpu: no layer2..4
    "nc": ["--mask_batch_size", "4", "--round_steps", "2", "--mask_rounds", "2", "--epochs", "1"],
    "rnp": ["--unlearning_epochs", "1", "--recovering_epochs", "1"],
    "sau": ["--n_rounds", "1", "--adv_steps", "2"],
    "tsbd": ["--epochs", "1", "--n", "0.1", "--ft_epoch", "0"],
    "ulrl": ["--unlearning_epochs", "1", "--relearn_epochs", "1"],
}


def script(name):
    return load_script(f"defense/{name}.py")


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """A synthetic CIFAR-10 and one tiny record made from it; each run copies the record folder."""
    root = tmp_path_factory.mktemp("contract")
    cifar10 = write_synthetic_cifar10(root / "data" / "cifar10", train_per_batch=40, test_count=60)
    write_tiny_record(root / "records", "tiny", cifar10)
    return root


def run_defense_in_process(name, world, target, *extra):
    """main() of defense `name` on a fresh copy of the tiny record under target/; returns its output folder."""
    shutil.copytree(world / "records" / "tiny", target / "tiny")
    code = script(name).main(["--result_file", "tiny", "--record_dir", str(target), "--dataset", "cifar10",
                              "--dataset_path", str(world / "data"), "--device", "cpu", "--progress", "False",
                              "--ratio", "0.5", *QUICK[name], *extra])
    assert code == 0
    return target / "tiny" / "defense" / name


def test_every_defense_is_covered_here():
    assert set(QUICK) == set(DEFENSES), "add the new defense's quick options to QUICK"


@pytest.mark.parametrize("name", DEFENSES)
def test_options_come_from_yaml_only(name):
    parser = script(name).build_parser()
    for action in parser._actions:
        if action.dest != "help":
            assert action.default is None, f"--{action.dest} has a code default; defaults live in YAML"
            assert action.help, f"--{action.dest} has no help text"
    args = parse_defense_args(parser, ["--result_file", "x"], name)
    expected = defense_defaults(parser, name)
    assert expected, "no defaults read"
    for key, value in expected.items():
        assert getattr(args, key) == value, key
    own = read_yaml(DEFENSE_CONFIGS / name / "config.yaml")
    assert all(key in expected for key in own)
    assert (DEFENSE_CONFIGS / name / "cifar10.yaml").is_file()  # BackdoorBench's usual --yaml_path


@pytest.mark.parametrize("name", DEFENSES)
def test_help_shows_every_default(name, capsys):
    with pytest.raises(SystemExit) as stop:
        script(name).main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert "--result_file NAME" in text and "(required)" in text
    assert "--amp {auto,true,false}" in text and "(default: auto)" in text
    assert "--progress {true,false}" in text


@pytest.mark.parametrize("name", DEFENSES)
def test_a_bad_option_is_one_clear_error_before_anything_is_loaded(name, capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        run_cli(script(name).main, ["--result_file", "tiny", "--record_dir", str(tmp_path), "--ratio", "2"])
    assert stop.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--ratio" in lines[0]


@pytest.mark.parametrize("name", DEFENSES)
def test_end_to_end_in_process_on_a_tiny_record(name, tiny_world, tmp_path):
    folder = run_defense_in_process(name, tiny_world, tmp_path)
    summary = json.loads((folder / "summary.json").read_text())
    for when in ("before", "after"):
        assert {"test_acc", "test_asr", "test_ra"} <= set(summary[when])
        assert all(0.0 <= summary[when][key] <= 1.0 for key in ("test_acc", "test_asr", "test_ra"))
    assert summary["defense"] == name and summary["clean_samples"] == 100 and summary["seconds"]["total"] > 0
    saved = torch.load(folder / "defense_result.pt", weights_only=True)
    load_weights(build_model(saved["model_name"], saved["num_classes"]), saved["model"])
    assert (folder / "index.txt").is_file() and list((folder / "log").glob("*.log"))
    assert not list((tmp_path / "tiny" / "defense").glob(".*"))  # no partial or previous folder left


def test_anp_result_does_not_depend_on_eval_every(tiny_world, tmp_path):
    """Evaluating the test sets between mask iterations must not switch BatchNorm to running statistics."""
    quiet = run_defense_in_process("anp", tiny_world, tmp_path / "quiet", "--print_every", "1", "--eval_every", "0")
    evaluated = run_defense_in_process("anp", tiny_world, tmp_path / "evaluated", "--print_every", "1",
                                       "--eval_every", "1")
    masks_quiet = pd.read_csv(quiet / "mask_values.csv")
    masks_evaluated = pd.read_csv(evaluated / "mask_values.csv")
    pd.testing.assert_frame_equal(masks_quiet, masks_evaluated)
    assert pd.read_csv(evaluated / "mask_df.csv")["test_acc"].notna().all()  # it did evaluate every row
