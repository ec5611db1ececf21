"""Records we write: the exact structure of a BackdoorBench record, read back through our loader, poisoning rules."""
import numpy as np
import pytest
import torch

from conftest import SHARED_RECORDS, require_shared_record
from utils.attack_record import new_record_folder, write_attack_record
from utils.errors import UserError
from utils.models import build_model
from utils.poisoning import backdoor_labels, poison, bd_test_indices, train_poison_indices
from utils.records import load_attack_record, load_record_pickle
from utils.safe_pickle import safe_torch_load
from utils.triggers import TRIGGERS, trigger


def _synthetic_split(count, seed, classes=10):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8), np.arange(count) % classes


def _write(tmp_path, name="synthetic_badnet", trigger_name="badnet", label_transform="all2one", pratio=0.1):
    train_x, train_y = _synthetic_split(200, 1)
    test_x, test_y = _synthetic_split(50, 2)
    spec = trigger(trigger_name)
    rng = np.random.default_rng(0)
    train_idx = train_poison_indices(train_y, pratio, 0, spec.clean_label, rng)
    train_bd = train_y if spec.clean_label else backdoor_labels(train_y, label_transform, 0, 10)
    bd_train = poison(train_x, train_y, train_idx, spec.apply, train_bd, len(train_y))
    test_idx = bd_test_indices(test_y, label_transform, 0)
    bd_test = poison(test_x, test_y, test_idx, spec.apply, backdoor_labels(test_y, label_transform, 0, 10),
                     len(test_y))
    model = build_model("preactresnet18", 10)
    with new_record_folder(tmp_path / "record" / name) as out:
        write_attack_record(out.path, name, model_name="preactresnet18", num_classes=10,
                            state_dict=model.state_dict(), clean_data="cifar10", img_size=(32, 32, 3),
                            bd_train=bd_train, bd_test=bd_test, info={"attack": trigger_name, "pratio": pratio})
    return tmp_path / "record" / name, (train_x, train_y, test_x, test_y), model


def _shape_of(value):
    """The structure of a record value: dict keys (with key types) and leaf types, recursively."""
    if isinstance(value, dict):
        keys = list(value)
        if keys and all(isinstance(k, (int, np.integer)) for k in keys):  # data_dict: one sample's shape
            return ("data_dict", type(keys[0]).__name__, _shape_of(value[keys[0]]))
        return {key: _shape_of(item) for key, item in value.items()}
    if isinstance(value, np.ndarray):
        return ("ndarray", str(value.dtype), value.ndim)
    if isinstance(value, list):
        return ("list", tuple(type(item).__name__ for item in value))
    if isinstance(value, tuple):
        return ("tuple", tuple(type(item).__name__ for item in value))
    return type(value).__name__


def test_written_record_has_the_structure_of_a_backdoorbench_record(tmp_path):
    folder, _, _ = _write(tmp_path)
    require_shared_record("badnet_0_1")
    ours = safe_torch_load(folder / "attack_result.pt")
    theirs = safe_torch_load(SHARED_RECORDS / "badnet_0_1" / "attack_result.pt")
    assert list(ours) == list(theirs)
    for key in ("bd_train", "bd_test", "img_size", "num_classes", "clean_data", "data_path", "model_name"):
        assert _shape_of(ours[key]) == _shape_of(theirs[key]), key
    assert list(ours["model"]) == list(theirs["model"])
    assert type(ours["model"]) is type(theirs["model"])
    # same files beside it, and the same zip layout (archive folder named after the file)
    import zipfile
    for name in ("attack_result.pt", "info.pickle", "train_poison_index_list.pickle"):
        assert (folder / name).is_file()
        ours_zip = sorted(n.split("/", 1)[0] for n in zipfile.ZipFile(folder / name).namelist())
        theirs_zip = sorted(n.split("/", 1)[0] for n in zipfile.ZipFile(SHARED_RECORDS / "badnet_0_1" / name).namelist())
        assert set(ours_zip) == set(theirs_zip), name
    path = next(iter(ours["bd_test"]["bd_data_container"]["data_dict"].values()))["path"]
    assert path.startswith("./record/synthetic_badnet/bd_test_dataset/")


@pytest.mark.parametrize("trigger_name", sorted(TRIGGERS))
def test_record_reads_back_with_trigger_pixels(tmp_path, trigger_name):
    folder, (train_x, train_y, test_x, test_y), model = _write(tmp_path, f"synthetic_{trigger_name}", trigger_name)
    record = load_attack_record(folder.name, folder.parent)
    assert record.model_name == "preactresnet18" and record.clean_data == "cifar10"
    for key, value in model.state_dict().items():
        assert torch.equal(record.state_dict[key], value)
    spec = TRIGGERS[trigger_name]
    for split, (x, y) in ((record.bd_train, (train_x, train_y)), (record.bd_test, (test_x, test_y))):
        expected = spec.apply(x[split.original_indices])
        assert np.array_equal(split.images(), expected)  # PNG pixels == trigger(clean image)
        assert np.array_equal(split.original_labels, y[split.original_indices])
    if spec.clean_label:
        assert (train_y[record.bd_train.original_indices] == 0).all()
        assert np.array_equal(record.bd_train.bd_labels, record.bd_train.original_labels)
    else:
        assert len(record.bd_train) == 20 and (record.bd_train.bd_labels == 0).all()
    assert (test_y[record.bd_test.original_indices] != 0).all() and len(record.bd_test) == 45
    indicator = load_record_pickle(folder, "train_poison_index_list.pickle")
    assert indicator.dtype == np.float64 and np.flatnonzero(indicator).tolist() == record.bd_train.original_indices.tolist()
    assert load_record_pickle(folder, "info.pickle")["attack"] == trigger_name


def test_all_to_all_shifts_labels_and_keeps_every_test_image(tmp_path):
    folder, (_, train_y, _, test_y), _ = _write(tmp_path, "synthetic_all2all", label_transform="all2all")
    record = load_attack_record(folder.name, folder.parent)
    assert len(record.bd_test) == len(test_y)
    assert np.array_equal(record.bd_test.bd_labels, (record.bd_test.original_labels + 1) % 10)
    assert np.array_equal(record.bd_train.bd_labels, (train_y[record.bd_train.original_indices] + 1) % 10)


def test_existing_record_is_never_overwritten(tmp_path):
    folder, _, _ = _write(tmp_path)
    before = (folder / "attack_result.pt").read_bytes()
    with pytest.raises(UserError, match="already exists"):
        _write(tmp_path)
    assert (folder / "attack_result.pt").read_bytes() == before
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with new_record_folder(tmp_path / "record" / "broken") as out:
            (out.path / "half.png").write_bytes(b"x")
            raise RuntimeError("crash while writing")
    assert list((tmp_path / "record").iterdir()) == []


def test_poison_counts_and_clean_label_cap():
    labels = np.arange(1000) % 10
    rng = np.random.default_rng(0)
    chosen = train_poison_indices(labels, 0.1, 0, False, rng)
    assert len(chosen) == 100 and len(set(chosen)) == 100 and np.all(np.diff(chosen) > 0)
    clean_label = train_poison_indices(labels, 0.5, 3, True, rng)
    assert len(clean_label) == 100 and (labels[clean_label] == 3).all()  # capped at the target class size
    with pytest.raises(UserError):
        train_poison_indices(labels, 1.5, 0, False, rng)
