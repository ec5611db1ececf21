"""BackdoorBench attack records (record/<name>/attack_result.pt): v2 (V2.0 absolute / V2.2 relative paths), v1.

Loading goes through the allow-list unpickler (utils.safe_pickle): a record never runs code. v1 records and
in-memory v2 records pickle PIL images and are read only with an explicit trust option.
"""
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from utils.errors import UserError, one_line, summarise_error
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

    def check_labels(self, num_classes, path):
        """Indices unique and >= 0 (the split's size is checked against the clean data later), backdoor labels in
        [0, num_classes), original labels too (or -1 where a v1 record does not store them)."""
        def first(bad, values):
            return int(values[np.flatnonzero(bad)[0]])
        if (self.original_indices < 0).any():
            raise UserError(f"{path}: {self.name} index {first(self.original_indices < 0, self.original_indices)} "
                            "is negative")
        unique, counts = np.unique(self.original_indices, return_counts=True)
        if (counts > 1).any():
            raise UserError(f"{path}: {self.name} holds sample {int(unique[counts > 1][0])} more than once")
        bad = (self.bd_labels < 0) | (self.bd_labels >= num_classes)
        if bad.any():
            raise UserError(f"{path}: {self.name} backdoor label {first(bad, self.bd_labels)} is outside "
                            f"[0, {num_classes})")
        bad = (self.original_labels < -1) | (self.original_labels >= num_classes)
        if bad.any():
            raise UserError(f"{path}: {self.name} original label {first(bad, self.original_labels)} is outside "
                            f"[0, {num_classes})")

    def images(self, img_size=None):
        """uint8 array (N, H, W, C) of the poisoned images, in `original_indices` order. With img_size (H, W[, C])
        every PNG is checked first, from its header: PNG format, that size, and RGB (C 3) or greyscale (C 1), so a
        different or oversized image is one clear error, never decoded."""
        if self.pil_images is not None:
            arrays = [np.asarray(image) for image in self.pil_images]
            if any(a.dtype != np.uint8 for a in arrays):  # a cast would turn float images in [0, 1] black
                raise UserError(f"{self.name}: images must hold uint8 pixels, found "
                                f"{next(a.dtype for a in arrays if a.dtype != np.uint8)}")
        else:
            arrays = [self._read_png(path, img_size) for path in self.image_paths]
        if not arrays:
            raise UserError(f"{self.name} of the record holds no images")
        arrays = [a[..., None] if a.ndim == 2 else a for a in arrays]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise UserError(f"{self.name}: its images differ in shape ({', '.join(map(str, sorted(shapes)[:3]))})")
        return np.stack(arrays)

    def _read_png(self, path, img_size):
        try:
            with Image.open(path) as image:
                if img_size is not None:
                    height, width = img_size[:2]
                    mode = {1: "L", 3: "RGB"}.get(img_size[2] if len(img_size) > 2 else 3)
                    if image.format != "PNG" or image.size != (width, height) or image.mode != mode:
                        raise UserError(f"poisoned image {path} is a {image.format} {image.mode} image of "
                                        f"{image.size[0]}x{image.size[1]}; the record needs {mode} PNGs of "
                                        f"{width}x{height}")
                return np.asarray(image, dtype=np.uint8)
        except UserError:
            raise
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise UserError(f"cannot read poisoned image {path}: {summarise_error(err)}") from None


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


MAX_VISITS = 2_000_000  # containers and items walked in one record: ~40x a 100-epoch CIFAR-10 record's
MAX_ELEMENTS = 1 << 31  # elements of one tensor or array
MAX_CLASSES = 100_000


def check_bounded(value, path, budget=MAX_VISITS):
    """Walk the loaded object once, with a budget: a pickle can share one list many times over (a few MB that
    stand for 10^12 items when walked), which would hang any later code that walks or prints it."""
    stack, visits = [value], 0
    while stack:
        item = stack.pop()
        visits += 1
        if visits > budget:
            raise UserError(f"{path}: holds more than {budget:,} nested items (or one list shared over and over): "
                            "not a BackdoorBench record")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif isinstance(item, (torch.Tensor, np.ndarray)):
            if item.dtype == object:
                raise UserError(f"{path}: holds an array of Python objects, which no record needs")
            count = item.size if isinstance(item, np.ndarray) else item.numel()
            if count > MAX_ELEMENTS:
                raise UserError(f"{path}: holds a tensor of {count:,} elements")


def _short(value, limit=80):
    return one_line(repr(value) if not isinstance(value, str) else value, limit)


def _text_field(raw, key, path, limit):
    value = raw[key]
    if not isinstance(value, str) or len(value) > limit:
        what = f"a {type(value).__name__}" if not isinstance(value, str) else f"{len(value):,} characters long"
        raise UserError(f"{path}: field {key} must be a text of at most {limit} characters, but it is {what}")
    return value


def _int_field(value, path, key, low, high):
    """An integer (Python or numpy, not bool) in [low, high]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise UserError(f"{path}: field {key} must be an integer in [{low}, {high}], got {_short(value)}")
    return int(value)


def _checked_fields(raw, path):
    """model_name, num_classes, state_dict, data_path, img_size and clean_data, each of the type and range a
    record has, or one clear error naming the first field that is off."""
    num_classes = _int_field(raw["num_classes"], path, "num_classes", 1, MAX_CLASSES)
    img_size = raw["img_size"]
    if not isinstance(img_size, (list, tuple)) or len(img_size) not in (2, 3):
        raise UserError(f"{path}: field img_size must be (height, width[, channels]), got {_short(img_size)}")
    img_size = tuple(_int_field(v, path, "img_size", 1, 4096) for v in img_size)
    weights = raw["model"]
    if not isinstance(weights, dict):
        raise UserError(f"{path}: field model must be a state_dict (a dict of tensors), got "
                        f"{type(weights).__name__}")
    for key, tensor in weights.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise UserError(f"{path}: model weight {_short(key)} is a {type(tensor).__name__}, not a tensor")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{path}: model weight {_short(key)} holds NaN or infinite values")
    return dict(model_name=_text_field(raw, "model_name", path, 1000), num_classes=num_classes,
                state_dict=strip_module_prefix(weights), data_path=_text_field(raw, "data_path", path, 4096),
                img_size=img_size, clean_data=_text_field(raw, "clean_data", path, 200))


def load_attack_record(result_file, record_dir="record", trust=False):
    folder = record_folder(result_file, record_dir)
    path = folder / "attack_result.pt"
    raw = safe_torch_load(path, trust=trust)
    check_bounded(raw, path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a dict of record fields, got {type(raw).__name__}")
    missing = [key for key in RECORD_KEYS if key not in raw]
    if missing:
        raise UserError(f"{path} is not a BackdoorBench attack record: missing {', '.join(map(str, missing))}")
    if raw["bd_test"] is None:
        raise UserError(f"{path} has no bd_test: cannot measure the backdoor")
    for name in ("bd_train", "bd_test"):
        if raw[name] is not None and not isinstance(raw[name], dict):
            raise UserError(f"{path}: field {name} is a {type(raw[name]).__name__}, not a dict")
    fields = _checked_fields(raw, path)
    version = "v1" if "x" in raw["bd_test"] else "v2"
    parse = _parse_v1_split if version == "v1" else _parse_v2_split
    splits = {name: None if raw[name] is None else parse(raw[name], name, folder) for name in ("bd_train", "bd_test")}
    for split in splits.values():
        if split is not None:
            split.check_labels(fields["num_classes"], path)
    return AttackRecord(folder=folder, **fields, **splits, version=version,
                        extra={key: value for key, value in raw.items() if key not in RECORD_KEYS})


def _inside(candidate, resolved_folder):
    """Whether `candidate`, links resolved, lies inside the (already resolved) record folder."""
    try:
        candidate.resolve().relative_to(resolved_folder)
        return True
    except (ValueError, OSError, RuntimeError):
        return False


def _resolve_image(recorded, folder, resolved_folder, split_folder, original_label, index, file_format):
    """The PNG beside the record, else the recorded path (V2.2 paths are relative to the BackdoorBench root and
    V2.0 paths absolute on the attacker's machine, so the copy beside the loaded record is the one to trust).
    Only files inside the record folder count: a recorded `../` or absolute path, or a link out of the folder,
    never reads a file elsewhere on the machine."""
    candidates = [folder / split_folder / str(original_label) / f"{index}{file_format}"]
    if isinstance(recorded, str) and recorded:
        candidates.append(folder / recorded if not Path(recorded).is_absolute() else Path(recorded))
    for candidate in candidates:
        if candidate.is_file() and _inside(candidate, resolved_folder):
            return candidate
    return None


def _sample_index(key, name, path):
    """A data_dict key as an int: an int, or a text of decimal digits."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
        return int(key)
    if isinstance(key, str) and key.isdigit() and len(key) < 12:
        return int(key)
    raise UserError(f"{path}: {name} sample key {_short(key)} is not a sample index")


def _parse_v2_split(state, name, folder):
    path = folder / "attack_result.pt"
    try:
        container = state["bd_data_container"]
        data_dict = container["data_dict"]
        if not isinstance(data_dict, dict):
            raise TypeError(f"data_dict is a {type(data_dict).__name__}, not a dict")
        save_folder = container.get("save_folder_path") or state.get("save_folder_path") or name + "_dataset"
        if not isinstance(save_folder, str) or len(save_folder) > 4096:
            raise TypeError("save_folder_path is not a path text")
        split_folder = os.path.basename(os.path.normpath(save_folder))
        file_format = container.get("save_file_format", ".png")
        if not isinstance(file_format, str) or not 2 <= len(file_format) <= 8 or "/" in file_format:
            raise TypeError(f"save_file_format {_short(file_format, 40)} is not a file ending such as .png")
        resolved_folder = folder.resolve()  # once, not per image
        keyed = {}
        for key in data_dict:
            index = _sample_index(key, name, path)
            if index in keyed:
                raise UserError(f"{path}: {name} holds sample {index} twice (as {_short(keyed[index])} and "
                                f"{_short(key)})")
            keyed[index] = key
        indices, bd_labels, original_labels, paths, pil_images, unresolved = [], [], [], [], [], []
        for index in sorted(keyed):
            entry = data_dict[keyed[index]]
            if isinstance(entry, dict):
                bd_label, original_label = (_label(v, name, path) for v in entry["other_info"])
                image = _resolve_image(entry.get("path"), folder, resolved_folder, split_folder, original_label,
                                       index, file_format)
                if image is None:
                    unresolved.append(entry.get("path"))
                paths.append(image)
            else:  # in-memory mode: (PIL image, bd_label, original_label)
                image, bd_label, original_label = entry
                pil_images.append(image)
                bd_label, original_label = _label(bd_label, name, path), _label(original_label, name, path)
            indices.append(index)
            bd_labels.append(bd_label)
            original_labels.append(original_label)
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{path}: malformed {name} ({type(err).__name__}: {one_line(err, 200)})") from None
    if unresolved:
        raise UserError(f"{len(unresolved)} poisoned images of {name} not found inside the record folder, e.g. "
                        f"{_short(unresolved[0])} and {folder / split_folder}/<label>/<index>{file_format}: copy the "
                        f"whole record folder, including {split_folder}/")
    indicator = state.get("poison_indicator")
    return PoisonedSplit(name, np.asarray(indices, dtype=np.int64), np.asarray(bd_labels, dtype=np.int64),
                         np.asarray(original_labels, dtype=np.int64), image_paths=None if pil_images else paths,
                         pil_images=pil_images or None,
                         poison_indicator=None if indicator is None else np.asarray(indicator))


def _label(value, name, path):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer, torch.Tensor)):
        raise UserError(f"{path}: {name} label {_short(value)} is not an integer")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_floating_point():
            raise UserError(f"{path}: {name} label {_short(value)} is not an integer")
        value = value.item()
    if not -(1 << 40) < int(value) < 1 << 40:
        raise UserError(f"{path}: {name} label {_short(value)} is out of range")
    return int(value)


def _parse_v1_split(state, name, folder):
    try:
        images = list(state["x"])
        bd_labels = np.asarray(state["y"], dtype=np.int64)
        indices = np.asarray(state["original_index"], dtype=np.int64)
        original = state.get("original_targets")
        original = np.full(len(indices), -1, dtype=np.int64) if original is None else np.asarray(original, np.int64)
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{folder / 'attack_result.pt'}: malformed v1 {name} ({type(err).__name__}: "
                        f"{one_line(err, 200)})") from None
    if not len(images) == len(bd_labels) == len(indices) == len(original):
        raise UserError(f"{folder / 'attack_result.pt'}: v1 {name} has {len(images)} images, {len(bd_labels)} labels "
                        f"and {len(indices)} indices; they must be as many")
    return PoisonedSplit(name, indices, bd_labels, original, pil_images=images)


def load_record_pickle(folder, filename, trust=False):
    """info.pickle / train_poison_index_list.pickle of a record, through the same allow-list and bounds."""
    value = safe_torch_load(Path(folder) / filename, trust=trust)
    check_bounded(value, Path(folder) / filename)
    return value
