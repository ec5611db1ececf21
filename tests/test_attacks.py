"""Every attack script end to end on a small synthetic CIFAR-10: the record is written, reads back through our
loader, and holds the right poisoned samples, pixels and labels."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import run_script, write_synthetic_cifar10
from utils.records import load_attack_record, load_record_pickle
from utils.triggers import TRIGGERS

ATTACKS = {"badnet": ("attack/badnet.py", "config/attack/badnet/default.yaml"),
           "blended": ("attack/blended.py", "config/attack/blended/default.yaml"),
           "sig": ("attack/sig.py", "config/attack/sig/default.yaml")}
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


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_writes_a_record_our_loader_reads(tmp_path, data, name):
    result, record_dir = _attack(tmp_path, data, name)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    train_x, train_y, test_x, test_y = data[1]
    record = load_attack_record(f"{name}_test", record_dir)
    clean_label = TRIGGERS[name].clean_label
    train_idx = record.bd_train.original_indices
    if clean_label:
        assert (train_y[train_idx] == 0).all() and len(train_idx) == int((train_y == 0).sum())
        assert np.array_equal(record.bd_train.bd_labels, train_y[train_idx])
    else:
        assert len(train_idx) == round(0.1 * len(train_y)) and (record.bd_train.bd_labels == 0).all()
    assert np.array_equal(record.bd_test.original_indices, np.flatnonzero(test_y != 0))
    assert (record.bd_test.bd_labels == 0).all()
    assert np.array_equal(record.bd_test.images(), TRIGGERS[name].apply(test_x[test_y != 0]))
    assert np.array_equal(record.bd_train.images(), TRIGGERS[name].apply(train_x[train_idx]))
    assert np.array_equal(record.bd_train.original_labels, train_y[train_idx])
    indicator = load_record_pickle(record.folder, "train_poison_index_list.pickle")
    assert np.flatnonzero(indicator).tolist() == train_idx.tolist()
    info = load_record_pickle(record.folder, "info.pickle")
    assert info["attack"] == name and info["pratio"] == 0.1 and info["attack_target"] == 0
    table = pd.read_csv(record.folder / "attack_df.csv", index_col=0, na_values=["nan_value"])
    assert len(table) == 1 and 0 <= table["test_acc"].iloc[-1] <= 1 and 0 <= table["test_asr"].iloc[-1] <= 1
    assert (record.folder / "attack_df_summary.csv").is_file() and list((record.folder).glob("*.log"))
    summary = json.loads((record.folder / "summary.json").read_text())
    assert summary["metrics"]["test_asr"] == table["test_asr"].iloc[-1]


def test_all_to_all_and_target_options(tmp_path, data):
    result, record_dir = _attack(tmp_path, data, "badnet", "--attack_label_trans", "all2all")
    assert result.returncode == 0, result.stderr[-2000:]
    record = load_attack_record("badnet_test", record_dir)
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
