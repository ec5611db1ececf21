"""Record loading: utils/safe_pickle.py (allow-list unpickling) and utils/records.py (BackdoorBench attack records).

Synthetic records are small and built in tmp_path; the real shared records (../shared/records) are copied into a
temporary folder once per module (they are only read there) or, where a test changes them, with `shared_record`.
"""
import builtins
import collections
import io
import os
import pickle
import pickletools
import shlex
import shutil
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from utils.errors import UserError
from utils.records import RECORD_KEYS, PoisonedSplit, load_attack_record, load_record_pickle
from utils.safe_pickle import ALLOWED_GLOBALS, ForbiddenGlobal, RestrictedUnpickler, safe_torch_load

from conftest import SHARED_RECORDS, require_shared_record  # noqa: E402
from helpers import load_script  # noqa: E402

fuzz_records = load_script("sh/fuzz_records.py")  # its hostile archives: TorchScript payload, bad zip fields

REAL_RECORDS = {"badnet_0_1": "badnet", "blended_0_1": "blended"}
TARGET = 0


# --------------------------------------------------------------------------------------------------------------
# helpers: pickle globals, synthetic records
# --------------------------------------------------------------------------------------------------------------

def pickle_globals(data):
    """The set of 'module name' strings a pickle imports (GLOBAL / STACK_GLOBAL / INST opcodes)."""
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("GLOBAL", "INST"):
            found.add(arg)
        elif op.name == "STACK_GLOBAL":
            found.add(f"{strings[-2]} {strings[-1]}")
        if isinstance(arg, str):
            strings.append(arg)
    return found


def data_pkl(path):
    """(name, bytes) of the pickle inside a torch zip file."""
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
        return name, archive.read(name)


def rewrite_zip_entry(source, target, entry, new_bytes):
    """Copy the zip `source` to `target` with the member `entry` replaced (same member order, stored)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            new.writestr(info.filename, new_bytes if info.filename == entry else old.read(info.filename))


def rng_images(n, size=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def small_state_dict(prefix=""):
    return collections.OrderedDict([
        (prefix + "conv1.weight", torch.randn(4, 3, 3, 3)),
        (prefix + "bn.running_mean", torch.randn(4)),
        (prefix + "bn.num_batches_tracked", torch.tensor(7)),
        (prefix + "linear.weight", torch.randn(10, 4)),
        (prefix + "linear.bias", torch.randn(10)),
    ])


# bd_test: (original_index, original_label); never the target class. bd_train: any label.
TEST_SAMPLES = [(12, 3), (1, 9), (4, 1), (7, 3), (30, 5), (3, 2)]  # deliberately not in index order
TRAIN_SAMPLES = [(5, 0), (0, 7), (9, 4), (8, 1)]


def v2_split(folder, name, samples, images, *, style="v22", record_name="rec", key=np.int64, write_pngs=True,
             n_total=40):
    """A v2 dataset state dict as BackdoorBench writes it, plus the PNGs beside the record."""
    split_folder = f"{name}_dataset"
    if style == "v22":
        base = f"./record/{record_name}/{split_folder}"
    elif style == "v20":
        base = f"/home/someone/BackdoorBench/record/{record_name}/{split_folder}"
    else:
        raise ValueError(style)
    data_dict = {}
    for (index, label), image in zip(samples, images):
        data_dict[key(index)] = {"path": f"{base}/{label}/{index}.png", "other_info": [TARGET, label]}
        if write_pngs:
            write_png(folder / split_folder / str(label) / f"{index}.png", image)
    indicator = np.zeros(n_total)
    indicator[[i for i, _ in samples]] = 1.0
    original_index_array = (np.arange(n_total) if name == "bd_train"
                            else np.array(sorted(i for i, _ in samples), dtype=np.int64))
    return {"bd_data_container": {"save_folder_path": base, "data_dict": data_dict, "save_file_format": ".png"},
            "getitem_all": True, "getitem_all_switch": False,
            "original_index_array": original_index_array, "poison_indicator": indicator,
            "save_folder_path": base}


def make_record(folder, *, style="v22", key=np.int64, write_pngs=True, state_dict=None, record_name=None):
    """A small v2 record in `folder`; returns (raw dict, {split: {original_index: (label, image)}})."""
    folder.mkdir(parents=True, exist_ok=True)
    record_name = record_name or folder.name
    test_images, train_images = rng_images(len(TEST_SAMPLES), seed=1), rng_images(len(TRAIN_SAMPLES), seed=2)
    raw = {
        "model_name": "preactresnet18",
        "num_classes": 10,
        "model": small_state_dict() if state_dict is None else state_dict,
        "data_path": "./data/cifar10",
        "img_size": (8, 8, 3),
        "clean_data": "cifar10",
        "bd_train": v2_split(folder, "bd_train", TRAIN_SAMPLES, train_images, style=style,
                             record_name=record_name, key=key, write_pngs=write_pngs),
        "bd_test": v2_split(folder, "bd_test", TEST_SAMPLES, test_images, style=style,
                            record_name=record_name, key=key, write_pngs=write_pngs),
    }
    expected = {"bd_test": {i: (label, img) for (i, label), img in zip(TEST_SAMPLES, test_images)},
                "bd_train": {i: (label, img) for (i, label), img in zip(TRAIN_SAMPLES, train_images)}}
    return raw, expected


def save_record(folder, raw):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(raw, folder / "attack_result.pt")
    return folder


def assert_split_matches(split, expected):
    """`split` (PoisonedSplit) holds exactly the samples of `expected` {index: (label, image)}, aligned."""
    assert len(split) == len(expected)
    assert sorted(split.original_indices.tolist()) == sorted(expected)
    assert split.original_indices.dtype == np.int64
    images = split.images()
    assert images.dtype == np.uint8 and images.shape == (len(expected), 8, 8, 3)
    for row, index in enumerate(split.original_indices.tolist()):
        label, image = expected[index]
        assert split.original_labels[row] == label
        assert split.bd_labels[row] == TARGET
        np.testing.assert_array_equal(images[row], image)


# --------------------------------------------------------------------------------------------------------------
# 1. security: nothing in a record runs
# --------------------------------------------------------------------------------------------------------------

def _write_marker(path):
    Path(path).write_text("payload ran")
    return "payload ran"


class MarkerPayload:
    """Unpickling calls _write_marker(path)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (_write_marker, (self.marker,))


class SystemPayload(MarkerPayload):
    """Unpickling calls os.system('touch marker')."""

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


class EvalPayload(MarkerPayload):
    """Unpickling calls builtins.eval(...) which writes the marker."""

    def __reduce__(self):
        return (builtins.eval, (f"open({self.marker!r}, 'w').write('payload ran')",))


class _ImportOs:
    def __reduce__(self):
        return (builtins.__import__, ("os",))


class _GetattrSystem:
    def __call__(self, *args):  # pickle wants the reduce callable to be callable
        raise AssertionError("only used for pickling")

    def __reduce__(self):
        return (builtins.getattr, (_ImportOs(), "system"))


class GetattrPayload(MarkerPayload):
    """Unpickling calls getattr(__import__('os'), 'system')('touch marker')."""

    def __reduce__(self):
        return (_GetattrSystem(), (f"touch {shlex.quote(self.marker)}",))


PAYLOADS = {
    "function": (MarkerPayload, "_write_marker"),
    "os.system": (SystemPayload, "system"),
    "builtins.eval": (EvalPayload, ".eval"),  # protocol 2 spells builtins as __builtin__
    "builtins.getattr": (GetattrPayload, ".getattr"),
}


def _plant(raw, where, payload):
    if where == "top_level":
        raw["extra_key"] = payload
    elif where == "bd_test_entry":
        entry = next(iter(raw["bd_test"]["bd_data_container"]["data_dict"].values()))
        entry["other_info"] = [TARGET, payload]
    elif where == "bd_test_container":
        raw["bd_test"]["bd_data_container"]["save_file_format"] = payload
    elif where == "state_dict":
        raw["model"]["layer9.evil"] = payload
    elif where == "bd_train_last":
        raw["bd_train"]["zzz"] = payload
    else:
        raise ValueError(where)
    return raw


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_malicious_record_is_refused_and_nothing_runs(tmp_path, kind):
    payload_class, global_name = PAYLOADS[kind]
    marker = tmp_path / "marker"
    folder = tmp_path / "record" / "evil"
    raw, _ = make_record(folder)
    save_record(folder, _plant(raw, "top_level", payload_class(marker)))
    assert global_name.split(".")[-1] in " ".join(pickle_globals(data_pkl(folder / "attack_result.pt")[1]))

    with pytest.raises(UserError) as info:
        load_attack_record("evil", tmp_path / "record")
    message = str(info.value)
    assert "--trust_record" in message and global_name in message and "attack_result.pt" in message
    with pytest.raises(UserError, match="--trust_record"):
        safe_torch_load(folder / "attack_result.pt")
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_payload_is_real_when_trusted(tmp_path, kind):
    """Control: the same file does run its payload under plain torch.load (trust), so the test above means something."""
    marker = tmp_path / "marker"
    folder = tmp_path / "evil"
    raw, _ = make_record(folder)
    save_record(folder, _plant(raw, "top_level", PAYLOADS[kind][0](marker)))
    safe_torch_load(folder / "attack_result.pt", trust=True)
    assert marker.exists()


@pytest.mark.parametrize("where", ["bd_test_entry", "bd_test_container", "state_dict", "bd_train_last"])
@pytest.mark.parametrize("kind", ["function", "os.system"])
def test_nested_payload_is_refused(tmp_path, where, kind):
    marker = tmp_path / "marker"
    folder = tmp_path / "record" / "evil"
    raw, _ = make_record(folder)
    save_record(folder, _plant(raw, where, PAYLOADS[kind][0](marker)))
    with pytest.raises(UserError, match="--trust_record"):
        load_attack_record(folder)
    assert not marker.exists()
    safe_torch_load(folder / "attack_result.pt", trust=True)  # control: it is a live payload
    assert marker.exists()


@pytest.mark.parametrize("protocol", [2, 5])
def test_plain_pickle_file_with_payload_is_refused(tmp_path, protocol):
    """Not a torch zip at all: torch.load falls back to its legacy path, which must use the allow-list too."""
    marker = tmp_path / "marker"
    folder = tmp_path / "evil"
    raw, _ = make_record(folder)
    raw["bd_train"] = None
    raw["model"] = {}  # plain-pickled tensors would name torch globals outside the allow-list
    raw = {"extra": MarkerPayload(marker), **raw}  # first, before numpy's protocol-5 globals
    (folder / "attack_result.pt").write_bytes(pickle.dumps(raw, protocol=protocol))
    with pytest.raises(UserError, match="_write_marker"):
        load_attack_record(folder)
    assert not marker.exists()


@pytest.mark.parametrize("filename", ["info.pickle", "train_poison_index_list.pickle"])
def test_crafted_side_pickle_is_refused(tmp_path, filename):
    marker = tmp_path / "marker"
    torch.save({"attack": "badnet", "pratio": 0.1, "evil": [MarkerPayload(marker)]}, tmp_path / filename)
    with pytest.raises(UserError, match="--trust_record"):
        load_record_pickle(tmp_path, filename)
    assert not marker.exists()
    load_record_pickle(tmp_path, filename, trust=True)  # control
    assert marker.exists()


def test_torchscript_archive_is_refused_before_its_code_runs(tmp_path, capfd):
    """torch.load(weights_only=False) hands TorchScript zips to torch.jit.load, which runs their __setstate__
    code without consulting the unpickler's allow-list."""
    folder = tmp_path / "record" / "evil"
    folder.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(fuzz_records.ScriptedPayload()), str(folder / "attack_result.pt"))
        capfd.readouterr()
        torch.jit.load(str(folder / "attack_result.pt"))  # control: loading it does run the code
        assert fuzz_records.MARKER in capfd.readouterr().out

        with pytest.raises(UserError, match="TorchScript") as info:
            safe_torch_load(folder / "attack_result.pt")
        assert "--trust_record" in str(info.value)
        with pytest.raises(UserError, match="TorchScript"):
            load_attack_record("evil", tmp_path / "record")
    assert fuzz_records.MARKER not in capfd.readouterr().out


def test_torchscript_archive_that_pythons_zipfile_cannot_read_is_still_refused(tmp_path, capfd):
    """The check asks torch's own reader, so a zip structure that only Python's zipfile rejects cannot hide an
    archive that torch.load would run as TorchScript."""
    folder = tmp_path / "record" / "evil"
    folder.mkdir(parents=True)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(fuzz_records.ScriptedPayload()), buffer)
        (folder / "attack_result.pt").write_bytes(fuzz_records.corrupt_central_extra(buffer.getvalue()))
        with pytest.raises(zipfile.BadZipFile):
            zipfile.ZipFile(folder / "attack_result.pt")
        capfd.readouterr()
        torch.load(folder / "attack_result.pt", weights_only=False)  # control: torch reads it and runs the code
        assert fuzz_records.MARKER in capfd.readouterr().out
        with pytest.raises(UserError, match="TorchScript"):
            load_attack_record("evil", tmp_path / "record")
    assert fuzz_records.MARKER not in capfd.readouterr().out


def test_a_changed_byte_under_a_stale_zip_crc_is_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.arange(1000, dtype=torch.float32)}, path)
    data = bytearray(path.read_bytes())
    at = data.find(struct.pack("<f", 500.0))
    data[at] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="CRC"):
        safe_torch_load(path)


def test_a_link_to_a_device_is_not_read(tmp_path):
    (tmp_path / "info.pickle").symlink_to("/dev/zero")
    with pytest.raises(UserError, match="not a regular file"):
        load_record_pickle(tmp_path, "info.pickle")


def test_restricted_unpickler_allow_list():
    assert ("numpy.core.multiarray", "_reconstruct") in ALLOWED_GLOBALS
    assert ("numpy._core.multiarray", "_reconstruct") in ALLOWED_GLOBALS
    assert ("numpy.core.multiarray", "scalar") in ALLOWED_GLOBALS
    assert ("numpy._core.multiarray", "scalar") in ALLOWED_GLOBALS
    for module, name in ALLOWED_GLOBALS:
        assert module.split(".")[0] in ("collections", "_codecs", "torch", "numpy"), (module, name)
    value = {"a": np.arange(5), "b": np.float64(2.5), "c": collections.OrderedDict(x=np.int64(3))}
    loaded = RestrictedUnpickler(io.BytesIO(pickle.dumps(value, protocol=2))).load()
    np.testing.assert_array_equal(loaded["a"], value["a"])
    assert loaded["b"] == 2.5 and type(loaded["c"]) is collections.OrderedDict and loaded["c"]["x"] == 3
    for forbidden in (os.system, builtins.eval, builtins.getattr, shutil.rmtree, Image.Image):
        with pytest.raises(ForbiddenGlobal):
            RestrictedUnpickler(io.BytesIO(pickle.dumps(forbidden, protocol=2))).load()


# --------------------------------------------------------------------------------------------------------------
# 2. v1 records and 7. in-memory v2 records (PIL images inside the pickle: trust only)
# --------------------------------------------------------------------------------------------------------------

def make_v1_record(folder):
    test_images, train_images = rng_images(len(TEST_SAMPLES), seed=3), rng_images(len(TRAIN_SAMPLES), seed=4)
    raw = {
        "model_name": "preactresnet18", "num_classes": 10, "model": small_state_dict(),
        "data_path": "../data/cifar10", "img_size": (8, 8, 3), "clean_data": "cifar10",
        "bd_train": {"x": [Image.fromarray(a) for a in train_images],
                     "y": np.full(len(TRAIN_SAMPLES), TARGET),
                     "original_index": np.array([i for i, _ in TRAIN_SAMPLES])},
        "bd_test": {"x": [Image.fromarray(a) for a in test_images],
                    "y": np.full(len(TEST_SAMPLES), TARGET),
                    "original_index": np.array([i for i, _ in TEST_SAMPLES]),
                    "original_targets": np.array([label for _, label in TEST_SAMPLES])},
    }
    save_record(folder, raw)
    return ({i: (label, img) for (i, label), img in zip(TEST_SAMPLES, test_images)},
            {i: img for (i, _), img in zip(TRAIN_SAMPLES, train_images)})


def test_v1_record_needs_trust(tmp_path):
    folder = tmp_path / "record" / "v1rec"
    make_v1_record(folder)
    with pytest.raises(UserError) as info:
        load_attack_record("v1rec", tmp_path / "record")
    assert "PIL" in str(info.value) and "--trust_record" in str(info.value)


def test_v1_record_loads_with_trust(tmp_path):
    folder = tmp_path / "record" / "v1rec"
    expected_test, expected_train = make_v1_record(folder)
    record = load_attack_record("v1rec", tmp_path / "record", trust=True)
    assert record.version == "v1" and record.name == "v1rec"
    assert record.data_path == "../data/cifar10" and record.img_size == (8, 8, 3)
    assert_split_matches(record.bd_test, expected_test)
    np.testing.assert_array_equal(record.bd_test.original_indices, [i for i, _ in TEST_SAMPLES])
    train = record.bd_train
    np.testing.assert_array_equal(train.original_indices, [i for i, _ in TRAIN_SAMPLES])
    assert (train.original_labels == -1).all() and (train.bd_labels == TARGET).all()
    np.testing.assert_array_equal(train.images(), np.stack([expected_train[i] for i, _ in TRAIN_SAMPLES]))


def make_in_memory_record(folder):
    raw, expected = make_record(folder, write_pngs=False)
    for name in ("bd_train", "bd_test"):
        data_dict = raw[name]["bd_data_container"]["data_dict"]
        for key in data_dict:
            label, image = expected[name][int(key)]
            data_dict[key] = (Image.fromarray(image), TARGET, label)
    save_record(folder, raw)
    return expected


def test_in_memory_v2_record_needs_trust(tmp_path):
    folder = tmp_path / "record" / "mem"
    make_in_memory_record(folder)
    with pytest.raises(UserError) as info:
        load_attack_record("mem", tmp_path / "record")
    assert "PIL" in str(info.value) and "--trust_record" in str(info.value)


def test_in_memory_v2_record_loads_with_trust(tmp_path):
    folder = tmp_path / "record" / "mem"
    expected = make_in_memory_record(folder)
    record = load_attack_record("mem", tmp_path / "record", trust=True)
    assert record.version == "v2"
    assert record.bd_test.image_paths is None and record.bd_test.pil_images is not None
    assert_split_matches(record.bd_test, expected["bd_test"])
    assert_split_matches(record.bd_train, expected["bd_train"])


# --------------------------------------------------------------------------------------------------------------
# 5. structure of attack_result.pt
# --------------------------------------------------------------------------------------------------------------

def test_synthetic_v22_record_loads(tmp_path):
    folder = tmp_path / "record" / "rec"
    raw, expected = make_record(folder)
    save_record(folder, raw)
    record = load_attack_record("rec", tmp_path / "record")
    assert (record.model_name, record.num_classes, record.img_size, record.clean_data, record.version) == \
        ("preactresnet18", 10, (8, 8, 3), "cifar10", "v2")
    assert record.folder == folder and record.extra == {}
    assert_split_matches(record.bd_test, expected["bd_test"])
    assert_split_matches(record.bd_train, expected["bd_train"])
    np.testing.assert_array_equal(record.bd_train.poison_indicator, raw["bd_train"]["poison_indicator"])
    # a folder path works as result_file too
    assert len(load_attack_record(str(folder), "does/not/matter").bd_test) == len(TEST_SAMPLES)


def test_module_prefix_is_stripped(tmp_path):
    folder = tmp_path / "rec"
    state_dict = small_state_dict(prefix="module.")
    state_dict["head.module.weight"] = torch.randn(2)  # only a leading `module.` is DataParallel's
    raw, _ = make_record(folder, state_dict=state_dict)
    save_record(folder, raw)
    loaded = load_attack_record(folder).state_dict
    assert list(loaded) == [key[len("module."):] if key.startswith("module.") else key for key in state_dict]
    assert "head.module.weight" in loaded and not any(key.startswith("module.") for key in loaded)
    for key, value in state_dict.items():
        new_key = key[len("module."):] if key.startswith("module.") else key
        assert torch.equal(loaded[new_key], value) and loaded[new_key].dtype == value.dtype


def test_unknown_extra_keys_are_tolerated(tmp_path):
    folder = tmp_path / "rec"
    raw, expected = make_record(folder)
    raw["attack_args"] = {"pratio": 0.1, "note": "V2.2 extra"}
    raw["clean_model_acc"] = np.float64(0.93)
    save_record(folder, raw)
    record = load_attack_record(folder)
    assert set(record.extra) == {"attack_args", "clean_model_acc"}
    assert record.extra["attack_args"]["pratio"] == 0.1
    assert_split_matches(record.bd_test, expected["bd_test"])


@pytest.mark.parametrize("missing", RECORD_KEYS)
def test_missing_required_key_is_named(tmp_path, missing):
    folder = tmp_path / "rec"
    raw, _ = make_record(folder)
    del raw[missing]
    save_record(folder, raw)
    with pytest.raises(UserError, match=rf"missing {missing}\b"):
        load_attack_record(folder)


@pytest.mark.parametrize("field, value", [("bd_test", 5), ("bd_test", None), ("bd_train", [1, 2]),
                                          ("model", None), ("img_size", None), ("num_classes", "ten")])
def test_malformed_fields_give_user_error(tmp_path, field, value):
    folder = tmp_path / "rec"
    raw, _ = make_record(folder)
    raw[field] = value
    save_record(folder, raw)
    with pytest.raises(UserError, match="attack_result.pt"):
        load_attack_record(folder)


def test_not_a_dict_gives_user_error(tmp_path):
    torch.save([1, 2, 3], tmp_path / "attack_result.pt")
    with pytest.raises(UserError, match="expected a dict"):
        load_attack_record(tmp_path)


def test_malformed_data_dict_gives_user_error(tmp_path):
    folder = tmp_path / "rec"
    raw, _ = make_record(folder)
    entry = next(iter(raw["bd_test"]["bd_data_container"]["data_dict"].values()))
    del entry["other_info"]
    save_record(folder, raw)
    with pytest.raises(UserError, match="malformed bd_test"):
        load_attack_record(folder)


def test_bd_train_none_is_allowed(tmp_path):
    folder = tmp_path / "rec"
    raw, expected = make_record(folder)
    raw["bd_train"] = None  # blind, lira
    save_record(folder, raw)
    record = load_attack_record(folder)
    assert record.bd_train is None
    assert_split_matches(record.bd_test, expected["bd_test"])


def test_plain_int_keys(tmp_path):
    """wanet / inputaware / bpp / lira write plain int data_dict keys."""
    folder = tmp_path / "rec"
    raw, expected = make_record(folder, key=int)
    save_record(folder, raw)
    assert "numpy._core.multiarray scalar" not in pickle_globals(data_pkl(folder / "attack_result.pt")[1])
    record = load_attack_record(folder)
    assert_split_matches(record.bd_test, expected["bd_test"])
    assert_split_matches(record.bd_train, expected["bd_train"])


def test_nonexistent_record(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_attack_record("nope", tmp_path / "record")
    (tmp_path / "record" / "empty").mkdir(parents=True)
    with pytest.raises(UserError, match="not found"):
        load_attack_record("empty", tmp_path / "record")
    with pytest.raises(UserError, match="not found"):
        safe_torch_load(tmp_path / "missing.pt")
    with pytest.raises(UserError, match="not found"):
        load_record_pickle(tmp_path, "info.pickle")


def _small_record_bytes(tmp_path):
    folder = tmp_path / "good"
    raw, _ = make_record(folder)
    save_record(folder, raw)
    return (folder / "attack_result.pt").read_bytes()


@pytest.mark.parametrize("how", ["empty", "garbage", "truncated_half", "truncated_end", "pickle_truncated"])
def test_corrupt_file_gives_user_error(tmp_path, how):
    good = _small_record_bytes(tmp_path)
    folder = tmp_path / "record" / "bad"
    folder.mkdir(parents=True)
    path = folder / "attack_result.pt"
    if how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif how == "truncated_half":
        path.write_bytes(good[: len(good) // 2])
    elif how == "truncated_end":
        path.write_bytes(good[:-20])
    else:
        path.write_bytes(pickle.dumps({"model_name": "x"}, protocol=2)[:-5])
    with pytest.raises(UserError, match="attack_result.pt"):
        load_attack_record("bad", tmp_path / "record")


@pytest.mark.parametrize("old, new", [
    (b"storage", b"Xtorage"),  # torch's persistent_load asserts on the typename (AssertionError)
    (b"latin1", b"latinQ"),  # _codecs.encode with an unknown encoding (LookupError)
    (b"_rebuild_tensor_v2", b"_rebuild_tensor_v9"),  # a global outside the allow-list
])
def test_corrupted_pickle_inside_zip_gives_user_error(tmp_path, old, new):
    folder = tmp_path / "rec"
    raw, _ = make_record(folder)
    save_record(folder, raw)
    name, data = data_pkl(folder / "attack_result.pt")
    assert old in data
    rewrite_zip_entry(folder / "attack_result.pt", tmp_path / "bad.pt", name, data.replace(old, new))
    with pytest.raises(UserError, match="bad.pt"):
        safe_torch_load(tmp_path / "bad.pt")
    (tmp_path / "bad.pt").replace(folder / "attack_result.pt")
    with pytest.raises(UserError):
        load_attack_record(folder)


# --------------------------------------------------------------------------------------------------------------
# 4. where the poisoned PNGs are found
# --------------------------------------------------------------------------------------------------------------

def test_v22_relative_paths_from_another_working_directory(tmp_path, monkeypatch):
    folder = tmp_path / "record" / "rec"
    raw, expected = make_record(folder)
    save_record(folder, raw)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    recorded = next(iter(raw["bd_test"]["bd_data_container"]["data_dict"].values()))["path"]
    assert not Path(recorded).exists()
    record = load_attack_record("rec", tmp_path / "record")
    assert all(Path(p).is_relative_to(folder) for p in record.bd_test.image_paths)
    assert_split_matches(record.bd_test, expected["bd_test"])
    assert_split_matches(record.bd_train, expected["bd_train"])


def test_v20_absolute_paths_fall_back_to_pngs_beside_record(tmp_path):
    folder = tmp_path / "record" / "rec"
    raw, expected = make_record(folder, style="v20", record_name="x")
    save_record(folder, raw)
    record = load_attack_record(folder)
    assert_split_matches(record.bd_test, expected["bd_test"])
    assert_split_matches(record.bd_train, expected["bd_train"])


def test_recorded_path_outside_the_record_folder_is_never_read(tmp_path, monkeypatch):
    """The PNGs are not beside the record; the V2.2 path would resolve from the BackdoorBench root (the cwd), an
    absolute path or a link elsewhere: each would read files outside the record folder, so each is refused."""
    bb_root = tmp_path / "BackdoorBench"
    raw, expected = make_record(bb_root / "record" / "rec")  # PNGs under BackdoorBench/record/rec/
    lone = save_record(tmp_path / "copy_without_pngs" / "rec", raw)
    monkeypatch.chdir(bb_root)
    with pytest.raises(UserError, match="not found inside the record folder.*copy the whole record folder"):
        load_attack_record(lone)
    for split in ("bd_train", "bd_test"):  # absolute recorded paths to the PNGs elsewhere
        for entry in raw[split]["bd_data_container"]["data_dict"].values():
            entry["path"] = str(bb_root / entry["path"])
    save_record(lone, raw)
    with pytest.raises(UserError, match="not found inside the record folder"):
        load_attack_record(lone)
    for name in ("bd_train_dataset", "bd_test_dataset"):  # a link out of the record folder
        (lone / name).symlink_to(bb_root / "record" / "rec" / name)
    with pytest.raises(UserError, match="not found inside the record folder"):
        load_attack_record(lone)


def test_png_beside_record_is_preferred(tmp_path, monkeypatch):
    bb_root = tmp_path / "BackdoorBench"
    raw, stale = make_record(bb_root / "record" / "rec")  # what the recorded (cwd-relative) paths point at
    folder = tmp_path / "mine" / "rec"
    for name, samples in (("bd_test", TEST_SAMPLES), ("bd_train", TRAIN_SAMPLES)):
        for (index, label), image in zip(samples, rng_images(len(samples), seed=99)):
            write_png(folder / f"{name}_dataset" / str(label) / f"{index}.png", image)
    save_record(folder, raw)
    monkeypatch.chdir(bb_root)
    record = load_attack_record(folder)
    assert all(Path(p).is_relative_to(folder) for p in record.bd_test.image_paths)
    fresh = dict(zip([i for i, _ in TEST_SAMPLES], rng_images(len(TEST_SAMPLES), seed=99)))
    images = record.bd_test.images()
    for row, index in enumerate(record.bd_test.original_indices.tolist()):
        np.testing.assert_array_equal(images[row], fresh[index])
        assert not np.array_equal(images[row], stale["bd_test"][index][1])


def test_missing_png_is_named(tmp_path):
    folder = tmp_path / "record" / "rec"
    raw, _ = make_record(folder)
    save_record(folder, raw)
    (folder / "bd_test_dataset" / "5" / "30.png").unlink()
    with pytest.raises(UserError) as info:
        load_attack_record("rec", tmp_path / "record")
    message = str(info.value)
    assert "1 poisoned images of bd_test not found" in message
    assert "./record/rec/bd_test_dataset/5/30.png" in message and "bd_test_dataset" in message


def test_unreadable_png_gives_user_error(tmp_path):
    folder = tmp_path / "record" / "rec"
    raw, _ = make_record(folder)
    save_record(folder, raw)
    (folder / "bd_test_dataset" / "5" / "30.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    record = load_attack_record(folder)
    with pytest.raises(UserError, match="30.png"):
        record.bd_test.images()


def test_empty_split_images_gives_user_error():
    empty = PoisonedSplit("bd_test", np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64),
                          image_paths=[])
    with pytest.raises(UserError, match="no images"):
        empty.images()


# --------------------------------------------------------------------------------------------------------------
# 6. the real shared records
# --------------------------------------------------------------------------------------------------------------

def read_png_folder(split_folder):
    """All <label>/<index>.png under split_folder, read directly with PIL: (indices, labels, images) by index."""
    entries = sorted((int(p.stem), int(p.parent.name), p) for p in split_folder.glob("*/*.png"))
    indices = np.array([e[0] for e in entries], dtype=np.int64)
    labels = np.array([e[1] for e in entries], dtype=np.int64)
    images = np.stack([np.asarray(Image.open(e[2]).convert("RGB")) for e in entries])
    return indices, labels, images


@pytest.fixture(scope="module")
def real_record_copy(tmp_path_factory):
    """Each shared record copied once (like conftest's shared_record) and loaded once; only read by the tests."""
    cache = {}

    def get(name):
        if name not in cache:
            source = SHARED_RECORDS / name
            require_shared_record(name)
            record_dir = tmp_path_factory.mktemp("shared") / "record"
            shutil.copytree(source, record_dir / name, ignore=shutil.ignore_patterns("defense"))
            record = load_attack_record(name, record_dir)
            raw = safe_torch_load(record_dir / name / "attack_result.pt")
            cache[name] = (record_dir / name, record, raw, record.bd_test.images())
        return cache[name]
    return get


@pytest.mark.parametrize("name", sorted(REAL_RECORDS))
def test_real_record_metadata(real_record_copy, name):
    folder, record, raw, _ = real_record_copy(name)
    assert (record.model_name, record.num_classes, record.img_size, record.clean_data, record.version) == \
        ("preactresnet18", 10, (32, 32, 3), "cifar10", "v2")
    assert record.data_path == "./data/cifar10" and record.name == name and record.folder == folder
    assert len(record.state_dict) == 102 and "linear.weight" in record.state_dict
    assert tuple(record.state_dict["linear.weight"].shape) == (10, 512)
    assert all(value.device.type == "cpu" for value in record.state_dict.values())
    # V2.2 paths relative to the BackdoorBench root, numpy.int64 keys
    data_dict = raw["bd_test"]["bd_data_container"]["data_dict"]
    key, entry = next(iter(data_dict.items()))
    assert type(key) is np.int64 and entry["path"].startswith(f"./record/{name}/bd_test_dataset/")


@pytest.mark.parametrize("name", sorted(REAL_RECORDS))
def test_real_record_bd_test(real_record_copy, name):
    folder, record, raw, images = real_record_copy(name)
    test = record.bd_test
    assert len(test) == 9000 and images.shape == (9000, 32, 32, 3) and images.dtype == np.uint8
    assert (test.bd_labels == TARGET).all() and (test.original_labels != TARGET).all()
    assert np.bincount(test.original_labels, minlength=10).tolist() == [0] + [1000] * 9
    assert len(np.unique(test.original_indices)) == 9000
    assert test.original_indices.min() >= 0 and test.original_indices.max() < 10000
    state = raw["bd_test"]
    data_dict = state["bd_data_container"]["data_dict"]
    np.testing.assert_array_equal(test.original_indices, sorted(int(k) for k in data_dict))
    np.testing.assert_array_equal(test.original_indices, state["original_index_array"])
    np.testing.assert_array_equal(test.original_labels, [data_dict[k]["other_info"][1] for k in sorted(data_dict)])
    assert test.poison_indicator.shape == (10000,) and test.poison_indicator.sum() == 9000
    np.testing.assert_array_equal(np.flatnonzero(test.poison_indicator), test.original_indices)
    assert all(Path(p).is_relative_to(folder / "bd_test_dataset") for p in test.image_paths)


@pytest.mark.parametrize("name", sorted(REAL_RECORDS))
def test_real_record_bd_test_images_equal_pngs(real_record_copy, name):
    folder, record, _, images = real_record_copy(name)
    indices, labels, direct = read_png_folder(folder / "bd_test_dataset")
    order = np.argsort(record.bd_test.original_indices)
    np.testing.assert_array_equal(record.bd_test.original_indices[order], indices)
    np.testing.assert_array_equal(record.bd_test.original_labels[order], labels)
    np.testing.assert_array_equal(images[order], direct)
    if name == "badnet_0_1":  # the 3x3 white patch in the bottom-right corner: these are the poisoned images
        assert (images[:, -3:, -3:, :] == 255).all()


@pytest.mark.parametrize("name", sorted(REAL_RECORDS))
def test_real_record_bd_train(real_record_copy, name):
    folder, record, raw, _ = real_record_copy(name)
    train = record.bd_train
    assert len(train) == 5000 and (train.bd_labels == TARGET).all()
    data_dict = raw["bd_train"]["bd_data_container"]["data_dict"]
    np.testing.assert_array_equal(train.original_indices, sorted(int(k) for k in data_dict))
    np.testing.assert_array_equal(raw["bd_train"]["original_index_array"], np.arange(50000))
    assert train.poison_indicator.shape == (50000,) and train.poison_indicator.sum() == 5000
    np.testing.assert_array_equal(np.flatnonzero(train.poison_indicator), train.original_indices)
    poison_list = load_record_pickle(folder, "train_poison_index_list.pickle")
    assert isinstance(poison_list, np.ndarray) and poison_list.shape == (50000,) and poison_list.sum() == 5000
    np.testing.assert_array_equal(poison_list, train.poison_indicator)
    # a sample of the poisoned training images, against the PNGs read directly
    sample = np.random.default_rng(0).choice(len(train), size=1500, replace=False)
    split = PoisonedSplit("bd_train", train.original_indices[sample], train.bd_labels[sample],
                          train.original_labels[sample], image_paths=[train.image_paths[i] for i in sample])
    direct = np.stack([np.asarray(Image.open(folder / "bd_train_dataset" / f"{label}/{index}.png").convert("RGB"))
                       for index, label in zip(split.original_indices, split.original_labels)])
    np.testing.assert_array_equal(split.images(), direct)


@pytest.mark.parametrize("name", sorted(REAL_RECORDS))
def test_real_record_info_pickle(real_record_copy, name):
    folder, _, _, _ = real_record_copy(name)
    assert pickle_globals(data_pkl(folder / "info.pickle")[1]) <= {f"{m} {n}" for m, n in ALLOWED_GLOBALS}
    info = load_record_pickle(folder, "info.pickle")
    assert info["attack"] == REAL_RECORDS[name]
    assert info["attack_target"] == TARGET and info["pratio"] == 0.1 and info["save_folder_name"] == name
    assert info["model"] == "preactresnet18" and info["dataset"] == "cifar10"


def test_real_record_v22_paths_from_another_working_directory(real_record_copy, tmp_path, monkeypatch):
    folder, original, raw, images = real_record_copy("badnet_0_1")
    monkeypatch.chdir(tmp_path)  # ./record/badnet_0_1/... does not resolve here
    recorded = [entry["path"] for entry in raw["bd_test"]["bd_data_container"]["data_dict"].values()]
    assert not any(Path(p).exists() for p in recorded[:100])
    record = load_attack_record("badnet_0_1", folder.parent)
    np.testing.assert_array_equal(record.bd_test.original_indices, original.bd_test.original_indices)
    np.testing.assert_array_equal(record.bd_test.images(), images)


# --------------------------------------------------------------------------------------------------------------
# 3. numpy 1 files (numpy.core.multiarray) and 4. V2.0 absolute paths, on the real records
# --------------------------------------------------------------------------------------------------------------

NUMPY2 = b"cnumpy._core.multiarray\n"
NUMPY1 = b"cnumpy.core.multiarray\n"


def test_shared_record_pickles_name_numpy_core():
    """The shared records were written with numpy 2: their pickles name numpy._core.multiarray (what test below
    rewrites), through protocol-2 GLOBAL opcodes."""
    require_shared_record("badnet_0_1")
    _, data = data_pkl(SHARED_RECORDS / "badnet_0_1" / "attack_result.pt")
    names = pickle_globals(data)
    assert {"numpy._core.multiarray _reconstruct", "numpy._core.multiarray scalar"} <= names
    assert not any(n.startswith("numpy.core.") for n in names)
    assert data.count(NUMPY2) >= 2 and data[:2] == b"\x80\x02"


def _link_pngs(source_folder, target_folder):
    """The PNG folders of source_folder as hard links inside target_folder (a symbolic link out of a record
    folder is refused, by design)."""
    target_folder.mkdir(parents=True, exist_ok=True)
    for split in ("bd_train_dataset", "bd_test_dataset"):
        shutil.copytree(source_folder / split, target_folder / split, copy_function=os.link)


@pytest.mark.parametrize("trust", [False, True])
def test_numpy1_record_loads_identically(real_record_copy, tmp_path, trust):
    folder, original, raw, images = real_record_copy("badnet_0_1")
    name, data = data_pkl(folder / "attack_result.pt")
    rewritten = data.replace(NUMPY2, NUMPY1)
    numpy1 = tmp_path / "record" / "badnet_0_1"
    _link_pngs(folder, numpy1)
    rewrite_zip_entry(folder / "attack_result.pt", numpy1 / "attack_result.pt", name, rewritten)
    names = pickle_globals(data_pkl(numpy1 / "attack_result.pt")[1])
    assert {"numpy.core.multiarray _reconstruct", "numpy.core.multiarray scalar"} <= names
    assert not any(n.startswith("numpy._core") for n in names)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2's numpy.core shim, under trust
        raw1 = safe_torch_load(numpy1 / "attack_result.pt", trust=trust)
        record = load_attack_record("badnet_0_1", tmp_path / "record", trust=trust)
    for split in ("bd_train", "bd_test"):
        for key in ("original_index_array", "poison_indicator"):
            assert raw1[split][key].dtype == raw[split][key].dtype
            np.testing.assert_array_equal(raw1[split][key], raw[split][key])
        keys1, keys = list(raw1[split]["bd_data_container"]["data_dict"]), list(raw[split]["bd_data_container"]["data_dict"])
        assert keys1 == keys and all(type(k) is np.int64 for k in keys1)
    assert list(raw1["model"]) == list(raw["model"])
    assert all(torch.equal(raw1["model"][k], raw["model"][k]) for k in raw["model"])
    np.testing.assert_array_equal(record.bd_test.original_indices, original.bd_test.original_indices)
    np.testing.assert_array_equal(record.bd_train.poison_indicator, original.bd_train.poison_indicator)
    np.testing.assert_array_equal(record.bd_test.images(), images)


def test_numpy1_side_pickle_loads(tmp_path):
    require_shared_record("badnet_0_1")
    source = SHARED_RECORDS / "badnet_0_1" / "train_poison_index_list.pickle"
    name, data = data_pkl(source)
    assert NUMPY2 in data
    rewrite_zip_entry(source, tmp_path / "train_poison_index_list.pickle", name, data.replace(NUMPY2, NUMPY1))
    np.testing.assert_array_equal(load_record_pickle(tmp_path, "train_poison_index_list.pickle"),
                                  safe_torch_load(source))


def test_real_record_v20_absolute_paths(shared_record, real_record_copy):
    folder = shared_record("badnet_0_1")
    _, original, _, images = real_record_copy("badnet_0_1")
    raw = safe_torch_load(folder / "attack_result.pt")
    for split in ("bd_train", "bd_test"):
        base = f"/home/someone/BackdoorBench/record/x/{split}_dataset"
        state = raw[split]
        state["save_folder_path"] = state["bd_data_container"]["save_folder_path"] = base
        for key, entry in state["bd_data_container"]["data_dict"].items():
            entry["path"] = f"{base}/{entry['other_info'][1]}/{int(key)}.png"
    torch.save(raw, folder / "attack_result.pt")

    record = load_attack_record("badnet_0_1", folder.parent)
    assert all(Path(p).is_relative_to(folder / "bd_test_dataset") for p in record.bd_test.image_paths)
    np.testing.assert_array_equal(record.bd_test.original_indices, original.bd_test.original_indices)
    np.testing.assert_array_equal(record.bd_test.original_labels, original.bd_test.original_labels)
    np.testing.assert_array_equal(record.bd_test.images(), images)
    assert len(record.bd_train) == 5000

    shutil.rmtree(folder / "bd_test_dataset")
    with pytest.raises(UserError) as info:
        load_attack_record("badnet_0_1", folder.parent)
    message = str(info.value)
    assert "9000 poisoned images of bd_test not found" in message
    assert "/home/someone/BackdoorBench/record/x/bd_test_dataset/" in message
    assert str(folder / "bd_test_dataset") in message
