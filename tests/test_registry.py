"""The registries (utils/registry.py) and the catalog of defenses and attacks (utils/catalog.py): every script on disk
is registered and every registered one exists, with its defaults; unknown names give one error listing the known."""
from pathlib import Path

import pytest

from utils.catalog import ATTACKS, DEFENSES
from utils.datasets import DATASETS
from utils.errors import UserError
from utils.models import MODELS
from utils.registry import Registry
from utils.triggers import TRIGGERS

ROOT = Path(__file__).resolve().parents[1]
NOT_ATTACKS = {"prototype"}  # attack/prototype.py trains a clean model: no trigger, not an attack


def test_lookup_error_names_the_kind_and_the_known_names():
    registry = Registry("widget")
    registry.add("b", 2)
    registry.add("a", 1)
    assert registry.lookup("a") == 1
    with pytest.raises(UserError, match=r"unknown widget 'c'; known: a, b$"):
        registry.lookup("c")
    with pytest.raises(ValueError, match="registered twice"):
        registry.add("a", 3)


def test_every_registry_has_the_same_shape():
    for registry, kind in ((MODELS, "model"), (DATASETS, "dataset"), (TRIGGERS, "trigger"), (DEFENSES, "defense"),
                           (ATTACKS, "attack")):
        assert isinstance(registry, Registry) and registry.kind == kind and len(registry) > 0


def test_the_catalog_matches_the_scripts_and_config_folders_on_disk():
    defenses = {path.stem for path in (ROOT / "defense").glob("*.py") if not path.stem.startswith("_")}
    attacks = {path.stem for path in (ROOT / "attack").glob("*.py") if not path.stem.startswith("_")} - NOT_ATTACKS
    assert set(DEFENSES) == defenses and set(ATTACKS) == attacks
    for entry in DEFENSES.values():
        assert (ROOT / entry.script).is_file() and (ROOT / entry.config_folder / "config.yaml").is_file()
        assert entry.kind == "defense" and entry.title and entry.summary
    for entry in ATTACKS.values():
        assert (ROOT / entry.script).is_file() and (ROOT / entry.config_folder / "default.yaml").is_file()
    assert set(TRIGGERS) <= set(ATTACKS)  # every trigger has its attack


def test_every_defense_script_runs_under_its_registered_name():
    for name, entry in DEFENSES.items():
        text = (ROOT / entry.script).read_text()
        assert f'DEFENSE = "{name}"' in text and "run_defense(build_parser(), argv, DEFENSE," in text
