"""Every attack script end to end on a small synthetic CIFAR-10: the record is written, reads back through our
loader, and holds the right poisoned samples, pixels and labels."""
import argparse
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from helpers import load_script, run_script, write_synthetic_cifar10
from utils.records import load_attack_record, load_record_pickle
from utils.safe_pickle import safe_torch_load
from utils.catalog import ATTACKS as REGISTERED_ATTACKS
from utils.triggers import TRIGGERS, wanet_grid

# script and attack YAML of every registered attack; inputaware's cpu.yaml: BackdoorBench's values but half an epoch
# of mask pre-training (25 epochs in default.yaml)
ATTACKS = {name: (entry.script, f"{entry.config_folder}/{'cpu' if name == 'inputaware' else 'default'}.yaml")
           for name, entry in REGISTERED_ATTACKS.items()}
DYNAMIC = {"wanet", "bpp", "inputaware"}  # poison while training: int data_dict keys, cross_test_dataset/
FAST = ["--model", "airbench_cpu", "--epochs", "1", "--batch_size", "64", "--progress", "False",
        "--device", "cpu", "--amp", "False"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    arrays = write_synthetic_cifar10(folder / "cifar10")
    return folder, arrays


def _attack(tmp_path, data, name, *extra):
    script, bd_yaml = ATTACKS[name]
    record_dir = tmp_path / "record"
    result = run_script(script, "--yaml_path", "config/attack/prototype/cifar10.yaml", "--bd_yaml_path", bd_yaml,
                        "--save_folder_name", f"{name}_test", "--record_dir", record_dir, "--dataset_path", data[0],
                        *FAST, *extra, timeout=600)
    return result, record_dir


def test_every_registered_trigger_has_an_attack_script():
    assert set(TRIGGERS) <= set(ATTACKS)


def _trigger(name, folder):
    """The record's trigger as a function of clean images: WaNet's from the grid saved in state_dict.pt,
    Input-aware's from the generators saved in netCGM.pt."""
    if name == "inputaware":
        return _inputaware(folder).apply
    if name == "wanet":
        state = safe_torch_load(folder / "state_dict.pt")
        grid = wanet_grid(state["identity_grid"], state["noise_grid"], s=0.5, grid_rescale=1)
        return lambda images: TRIGGERS["wanet"].apply(images, grid=grid)
    return TRIGGERS[name].apply


def _inputaware(folder):
    """The record's Input-aware attack, its generators loaded from netCGM.pt."""
    options = argparse.Namespace(**load_record_pickle(folder, "info.pickle"))
    return load_script("attack/inputaware.py").InputAware(options).load_generators(folder / "netCGM.pt")


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_writes_a_record_our_loader_reads(tmp_path, data, name):
    result, record_dir = _attack(tmp_path, data, name)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    train_x, train_y, test_x, test_y = data[1]
    record = load_attack_record(f"{name}_test", record_dir)
    clean_label = name in TRIGGERS and TRIGGERS[name].clean_label
    train_idx = record.bd_train.original_indices
    if clean_label:
        assert (train_y[train_idx] == 0).all() and len(train_idx) == int((train_y == 0).sum())
        assert np.array_equal(record.bd_train.bd_labels, train_y[train_idx])
    else:
        assert len(train_idx) == round(0.1 * len(train_y)) and (record.bd_train.bd_labels == 0).all()
    assert np.array_equal(record.bd_test.original_indices, np.flatnonzero(test_y != 0))
    assert (record.bd_test.bd_labels == 0).all()
    apply = _trigger(name, record.folder)
    assert np.array_equal(record.bd_test.images(), apply(test_x[test_y != 0]))
    assert np.array_equal(record.bd_train.images(), apply(train_x[train_idx]))
    assert np.array_equal(record.bd_train.original_labels, train_y[train_idx])
    indicator = load_record_pickle(record.folder, "train_poison_index_list.pickle")
    assert np.flatnonzero(indicator).tolist() == train_idx.tolist()
    info = load_record_pickle(record.folder, "info.pickle")
    assert info["attack"] == name and info["pratio"] == 0.1 and info["attack_target"] == 0
    table = pd.read_csv(record.folder / "attack_df.csv", index_col=0)
    assert len(table) == 1 and 0 <= table["test_acc"].iloc[-1] <= 1 and 0 <= table["test_asr"].iloc[-1] <= 1
    assert (record.folder / "attack_df_summary.csv").is_file() and list((record.folder).glob("*.log"))
    summary = json.loads((record.folder / "summary.json").read_text())
    assert summary["metrics"]["test_asr"] == table["test_asr"].iloc[-1]
    raw = safe_torch_load(record.folder / "attack_result.pt")
    keys = [key for split in ("bd_train", "bd_test") for key in raw[split]["bd_data_container"]["data_dict"]]
    assert {type(key) for key in keys} == ({int} if name in DYNAMIC else {np.int64})
    if name in DYNAMIC:  # every test image in noise mode, at its own label, and not the backdoor image
        cross = sorted((record.folder / "cross_test_dataset").glob("*/*.png"))
        assert sorted(int(p.stem) for p in cross) == list(range(len(test_y)))
        assert all(int(p.parent.name) == test_y[int(p.stem)] for p in cross)
        assert 0 <= table["test_cross_acc"].iloc[-1] <= 1
    if name == "inputaware":  # the cross images: each test image with the trigger generated for another one
        attack = _inputaware(record.folder)
        cross = np.stack([np.asarray(Image.open(p)) for p in sorted(
            (record.folder / "cross_test_dataset").glob("*/*.png"), key=lambda p: int(p.stem))])
        assert np.array_equal(cross, attack.cross(test_x))
        # cross differs from the image's own trigger wherever the generators' triggers differ between images; after
        # one epoch on 60 random images they can saturate to one pattern for all (seen once in a full-suite run, not
        # reproduced alone), and then both are equal by construction (the formula is tested in test_inputaware.py)
        stamped = apply(test_x)
        if len(np.unique(stamped.reshape(len(stamped), -1), axis=0)) > 1:
            assert not np.array_equal(cross, stamped)
        state = safe_torch_load(record.folder / "netCGM.pt")
        assert set(state["netC"]) == set(record.state_dict) and state["epoch"] == 1
    if name == "wanet":
        state = safe_torch_load(record.folder / "state_dict.pt")
        assert state["identity_grid"].shape == state["noise_grid"].shape == (1, 32, 32, 2)
        assert set(state["netC"]) == set(record.state_dict)


@pytest.mark.parametrize("name", ["badnet", "wanet"])
def test_all_to_all_and_target_options(tmp_path, data, name):
    result, record_dir = _attack(tmp_path, data, name, "--attack_label_trans", "all2all")
    assert result.returncode == 0, result.stderr[-2000:]
    record = load_attack_record(f"{name}_test", record_dir)
    test_y = data[1][3]
    assert len(record.bd_test) == len(test_y)
    assert np.array_equal(record.bd_test.bd_labels, (record.bd_test.original_labels + 1) % 10)
    assert np.array_equal(record.bd_train.bd_labels, (record.bd_train.original_labels + 1) % 10)


def test_existing_record_is_not_overwritten(tmp_path, data):
    first, record_dir = _attack(tmp_path, data, "badnet")
    assert first.returncode == 0, first.stderr[-2000:]
    before = (record_dir / "badnet_test" / "attack_result.pt").read_bytes()
    second, _ = _attack(tmp_path, data, "badnet", "--attack_target", "3")
    assert second.returncode == 2 and "already exists" in second.stderr
    assert (record_dir / "badnet_test" / "attack_result.pt").read_bytes() == before


def test_prototype_writes_a_clean_model(tmp_path, data):
    record_dir = tmp_path / "record"
    result = run_script("attack/prototype.py", "--yaml_path", "config/attack/prototype/cifar10.yaml",
                        "--save_folder_name", "clean", "--record_dir", record_dir, "--dataset_path", data[0],
                        *FAST, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    state = torch.load(record_dir / "clean" / "clean_model.pth", weights_only=True)
    assert "linear.weight" in state and not (record_dir / "clean" / "attack_result.pt").exists()


@pytest.mark.parametrize("name, options, message", [
    ("wanet", ["--cross_ratio", "20"], "pratio * (1 + cross_ratio)"),
    ("bpp", ["--squeeze_num", "1"], "--squeeze_num"),
    ("inputaware", ["--pratio", "0.6"], "--pratio must be in [0, 0.5]"),
])
def test_bad_dynamic_attack_options_are_one_clear_error(tmp_path, data, name, options, message):
    result, record_dir = _attack(tmp_path, data, name, *options)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (record_dir / f"{name}_test").exists()
