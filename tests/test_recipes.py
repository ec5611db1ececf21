"""Attack recipes for every registered dataset (config/attack/prototype/<dataset>.yaml, BackdoorBench's GPU recipe,
and <dataset>_cpu.yaml), each run at a toy size: one BadNets epoch on the dataset's test fixture writes a record that
reads back at the dataset's image size and class count. And every defense has config/defense/<name>/<dataset>.yaml for
every registered dataset, holding only options of that defense."""
import pytest

from helpers import load_script
from test_datasets import write_fixture
from utils.catalog import DEFENSES
from utils.config import read_yaml
from utils.datasets import DATASETS
from utils.defense_setup import parse_defense_args
from utils.records import load_attack_record

badnet = load_script("attack/badnet.py")
TOY = ["--epochs", "1", "--batch_size", "16", "--device", "cpu", "--amp", "False", "--progress", "False",
       "--num_workers", "0"]


@pytest.mark.parametrize("name", sorted(DATASETS))
@pytest.mark.parametrize("kind", ["", "_cpu"])
def test_every_dataset_has_both_recipes_naming_it(name, kind):
    recipe = read_yaml(f"config/attack/prototype/{name}{kind}.yaml")
    assert recipe["dataset"] == name and recipe["epochs"] >= 1 and recipe["model"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    for name in DATASETS:
        if name != "cifar10":  # cifar10's recipes run in test_attacks.py
            write_fixture(name, root / name)
    return root


@pytest.mark.parametrize("name", sorted(set(DATASETS) - {"cifar10"}))
@pytest.mark.parametrize("kind", ["", "_cpu"])
def test_recipe_runs_at_toy_size(name, kind, data, tmp_path):
    argv = ["--yaml_path", f"config/attack/prototype/{name}{kind}.yaml", "--bd_yaml_path",
            "config/attack/badnet/default.yaml", "--save_folder_name", f"{name}{kind}", "--record_dir",
            str(tmp_path), "--dataset_path", str(data), *TOY]
    assert badnet.main(argv) == 0
    record = load_attack_record(tmp_path / f"{name}{kind}")
    info = DATASETS[name]
    assert record.clean_data == name and record.img_size == info.img_size and record.num_classes == info.num_classes
    assert record.model_name == read_yaml(f"config/attack/prototype/{name}{kind}.yaml")["model"]
    assert len(record.bd_test) > 0


@pytest.mark.parametrize("defense", sorted(DEFENSES))
def test_every_defense_has_a_config_per_dataset_holding_only_its_options(defense):
    parser = load_script(f"defense/{defense}.py").build_parser()
    options = {action.dest for action in parser._actions}
    for name in DATASETS:
        path = f"config/defense/{defense}/{name}.yaml"
        unknown = set(read_yaml(path)) - options
        assert not unknown, f"{path}: {unknown} are not options of {defense}"
        args = parse_defense_args(parser, ["--result_file", "x", "--yaml_path", path], defense)
        assert args.yaml_path == path
