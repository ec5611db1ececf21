"""BackdoorBench attack records (record/<name>/attack_result.pt): v2 (V2.0 absolute / V2.2 relative paths), v1.

Loading goes through the allow-list unpickler (utils.safe_pickle): a record never runs code. v1 records and
in-memory v2 records pickle PIL images and are read only with an explicit trust option.
"""
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from utils.errors import UserError
from utils.models import strip_module_prefix
from utils.safe_pickle import safe_torch_load

RECORD_KEYS = ("model_name", "num_classes", "model", "data_path", "img_size", "clean_data", "bd_train", "bd_test")


@dataclass
class PoisonedSplit:
    """The poisoned samples of one split: original indices, labels, and where their images are."""
    name: str  # 'bd_train' or 'bd_test'
    original_indices: np.ndarray  # int64, indices into the clean split
    bd_labels: np.ndarray  # int64, the label the attack wants
    original_labels: np.ndarray  # int64 (-1 where the record does not say)
    image_paths: list = None  # v2 on disk: one resolved path per sample
    pil_images: list = None  # v1 / in-memory v2 (trusted records only)
    poison_indicator: np.ndarray = None

    def __len__(self):
        return len(self.original_indices)

    def images(self):
        """uint8 array (N, H, W, C) of the poisoned images, in `original_indices` order."""
        if self.pil_images is not None:
            arrays = [np.asarray(image, dtype=np.uint8) for image in self.pil_images]
        else:
            arrays = []
            for path in self.image_paths:
                try:
                    with Image.open(path) as image:
                        arrays.append(np.asarray(image, dtype=np.uint8))
                except OSError as err:
                    raise UserError(f"cannot read poisoned image {path}: {err}") from None
        if not arrays:
            raise UserError(f"{self.name} of the record holds no images")
        arrays = [a[..., None] if a.ndim == 2 else a for a in arrays]
        return np.stack(arrays)


@dataclass
class AttackRecord:
    folder: Path
    model_name: str
    num_classes: int
    state_dict: dict
    data_path: str
    img_size: tuple
    clean_data: str
    bd_train: PoisonedSplit
    bd_test: PoisonedSplit
    version: str  # 'v2' or 'v1'
    extra: dict = field(default_factory=dict)

    @property
    def name(self):
        return self.folder.name


def record_folder(result_file, record_dir="record"):
    """The folder of a record: `<record_dir>/<result_file>`, or `result_file` itself when it is a folder path."""
    as_path = Path(result_file)
    for folder in (Path(record_dir) / result_file, as_path):
        if (folder / "attack_result.pt").is_file():
            return folder
    raise UserError(f"attack record not found: expected {Path(record_dir) / result_file / 'attack_result.pt'}")


def load_attack_record(result_file, record_dir="record", trust=False):
    folder = record_folder(result_file, record_dir)
    raw = safe_torch_load(folder / "attack_result.pt", trust=trust)
    if not isinstance(raw, dict):
        raise UserError(f"{folder / 'attack_result.pt'}: expected a dict of record fields, got {type(raw).__name__}")
    missing = [key for key in RECORD_KEYS if key not in raw]
    if missing:
        raise UserError(f"{folder / 'attack_result.pt'} is not a BackdoorBench attack record: "
                        f"missing {', '.join(missing)}")
    if raw["bd_test"] is None:
        raise UserError(f"{folder / 'attack_result.pt'} has no bd_test: cannot measure the backdoor")
    try:
        for name in ("bd_train", "bd_test"):
            if raw[name] is not None and not isinstance(raw[name], dict):
                raise TypeError(f"{name} is a {type(raw[name]).__name__}, not a dict")
        fields = dict(model_name=str(raw["model_name"]), num_classes=int(raw["num_classes"]),
                      state_dict=strip_module_prefix(raw["model"]), data_path=str(raw["data_path"]),
                      img_size=tuple(int(v) for v in raw["img_size"]), clean_data=str(raw["clean_data"]))
    except (TypeError, ValueError, AttributeError) as err:
        raise UserError(f"{folder / 'attack_result.pt'}: malformed record ({type(err).__name__}: {err})") from None
    version = "v1" if "x" in raw["bd_test"] else "v2"
    parse = _parse_v1_split if version == "v1" else _parse_v2_split
    return AttackRecord(
        folder=folder,
        **fields,
        bd_train=None if raw["bd_train"] is None else parse(raw["bd_train"], "bd_train", folder),
        bd_test=parse(raw["bd_test"], "bd_test", folder),
        version=version,
        extra={key: value for key, value in raw.items() if key not in RECORD_KEYS},
    )


def _resolve_image(recorded, folder, split_folder, original_label, index, file_format):
    """The PNG beside the record, else the recorded path (V2.2 paths are relative to the BackdoorBench root and
    V2.0 paths absolute on the attacker's machine, so the copy beside the loaded record is the one to trust)."""
    candidates = [folder / split_folder / str(original_label) / f"{index}{file_format}"]
    if recorded:
        candidates.append(Path(recorded))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def _parse_v2_split(state, name, folder):
    try:
        container = state["bd_data_container"]
        data_dict = container["data_dict"]
        split_folder = os.path.basename(os.path.normpath(str(container.get("save_folder_path")
                                                             or state.get("save_folder_path") or name + "_dataset")))
        file_format = container.get("save_file_format", ".png")
        indices, bd_labels, original_labels, paths, pil_images, unresolved = [], [], [], [], [], []
        for key in sorted(data_dict, key=int):
            entry = data_dict[key]
            if isinstance(entry, dict):
                bd_label, original_label = (int(v) for v in entry["other_info"])
                path = _resolve_image(entry.get("path"), folder, split_folder, original_label, int(key), file_format)
                if path is None:
                    unresolved.append(entry.get("path"))
                paths.append(path)
            else:  # in-memory mode: (PIL image, bd_label, original_label)
                image, bd_label, original_label = entry
                pil_images.append(image)
            indices.append(int(key))
            bd_labels.append(int(bd_label))
            original_labels.append(int(original_label))
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{folder / 'attack_result.pt'}: malformed {name} ({type(err).__name__}: {err})") from None
    if unresolved:
        raise UserError(f"{len(unresolved)} poisoned images of {name} not found, e.g. {unresolved[0]} and "
                        f"{folder / split_folder}/<label>/<index>{file_format}: copy the whole record folder, "
                        f"including {split_folder}/")
    indicator = state.get("poison_indicator")
    return PoisonedSplit(name, np.asarray(indices, dtype=np.int64), np.asarray(bd_labels, dtype=np.int64),
                         np.asarray(original_labels, dtype=np.int64), image_paths=None if pil_images else paths,
                         pil_images=pil_images or None,
                         poison_indicator=None if indicator is None else np.asarray(indicator))


def _parse_v1_split(state, name, folder):
    try:
        images = list(state["x"])
        bd_labels = np.asarray(state["y"], dtype=np.int64)
        indices = np.asarray(state["original_index"], dtype=np.int64)
        original = state.get("original_targets")
        original = np.full(len(indices), -1, dtype=np.int64) if original is None else np.asarray(original, np.int64)
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{folder / 'attack_result.pt'}: malformed v1 {name} ({type(err).__name__}: {err})") from None
    return PoisonedSplit(name, indices, bd_labels, original, pil_images=images)


def load_record_pickle(folder, filename, trust=False):
    """info.pickle / train_poison_index_list.pickle of a record, through the same allow-list."""
    return safe_torch_load(Path(folder) / filename, trust=trust)
