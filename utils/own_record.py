"""A BackdoorBench-v2 record from a user's own pieces, so that every defense reads it unchanged.

The pieces: a model (registered name, `module:function` / `file.py:function` constructor plus a state_dict, or a
whole pickled model loaded only with explicit trust), its input normalisation, clean data (a registered dataset or an
ImageFolder-style folder with train/ and test/) and a backdoor test set (a registered trigger stamped on the clean
test images, or a folder of poisoned images), all-to-one onto a target label.

The record is attack_result.pt with the usual eight fields (bd_train None: no poisoned training set is known, as in
BackdoorBench's blind and lira records), bd_test_dataset/<original_label>/<index>.png, and info.pickle. Two extra
keys, which BackdoorBench's readers ignore, carry what the defenses need beyond the format: `normalization`
({'mean': [...], 'std': [...]}) and, for an image folder, `class_names` (label = position).
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from utils.attack_record import PoisonedSamples, split_state, write_split_pngs
from utils.datasets import (DATASETS, IMAGE_EXTENSIONS, IMAGE_FOLDER, CleanSplit, dataset_info, image_folder_classes,
                            image_folder_info, image_folder_split, image_folder_test_root, read_image)
from utils.errors import UserError
from utils.models import MODELS, build_model, load_weights
from utils.reporting import OutputFolder
from utils.triggers import TRIGGERS, trigger
from utils.user_models import (PICKLED, build_user_model, canonical_spec, check_outputs, is_user_model,
                               load_pickled_model, read_state_dict)


@dataclass
class CleanData:
    """Which clean data a record points at and how to read it."""
    name: str  # a registered dataset, or IMAGE_FOLDER
    data_path: str  # the record's data_path: ./data/<name>, or the image folder itself (absolute)
    info: object  # DatasetInfo
    class_names: list = None  # image folder only

    def split(self, train, dataset_path="data"):
        if self.name == IMAGE_FOLDER:
            return CleanSplit(IMAGE_FOLDER, self.data_path, train=train, info=self.info)
        return CleanSplit(self.name, dataset_path, train=train)


def checked_normalization(mean, std, channels):
    """mean and std as lists of `channels` floats (one value is repeated), std > 0, or one clear error."""
    if mean is None or std is None:
        raise UserError("give the input normalisation your model was trained with: --mean M [M M] --std S [S S] "
                        "(--mean 0 --std 1 if it takes pixels in [0, 1]); a wrong one silently lowers accuracy")
    values = {}
    for name, given in (("mean", mean), ("std", std)):
        given = [float(v) for v in given]
        if len(given) == 1:
            given = given * channels
        if len(given) != channels or not all(np.isfinite(given)):
            raise UserError(f"--{name} needs 1 or {channels} finite numbers (one per channel), got {given}")
        values[name] = given
    if min(values["std"]) <= 0:
        raise UserError(f"--std must be positive, got {values['std']}")
    return values["mean"], values["std"]


def first_image_size(folder, classes):
    """(H, W, C) of the first training image: C 1 for a greyscale image, else 3."""
    paths, _ = image_folder_split(folder, True, classes)
    from PIL import Image
    with Image.open(paths[0]) as image:
        return image.size[1], image.size[0], 1 if image.mode in ("L", "I", "I;16", "1") else 3


def resolve_clean_data(clean_data, img_size=None, mean=None, std=None):
    """A registered dataset name, or a folder holding train/<class>/ and test/<class>/ (or val/)."""
    if clean_data in DATASETS:
        info = dataset_info(clean_data)
        if img_size is not None and tuple(img_size) != tuple(info.img_size):
            raise UserError(f"--img_size {tuple(img_size)} differs from {clean_data}'s {info.img_size}; a "
                            f"registered dataset is read at its own size")
        return CleanData(clean_data, f"./data/{clean_data}", info)
    folder = Path(clean_data).expanduser()
    if not folder.is_dir():
        raise UserError(f"--clean_data {clean_data}: neither a registered dataset ({', '.join(sorted(DATASETS))}) "
                        "nor a folder")
    folder = folder.resolve()
    classes = image_folder_classes(folder)
    image_folder_test_root(folder)
    img_size = tuple(int(v) for v in img_size) if img_size else first_image_size(folder, classes)
    if len(img_size) != 3 or img_size[2] not in (1, 3) or min(img_size) < 1:
        raise UserError(f"--img_size must be H W C with C 1 or 3, got {img_size}")
    mean, std = checked_normalization(mean, std, img_size[2])
    return CleanData(IMAGE_FOLDER, str(folder), image_folder_info(img_size, mean, std, classes), classes)


def build_own_model(model, weights=None, model_file=None, trust_model_file=False, *, num_classes, img_size):
    """(model_name for the record, the model with its weights): a registered name or a user constructor with a
    state_dict file, or a whole pickled model file (only with trust_model_file)."""
    if model_file:
        if not trust_model_file:
            raise UserError(f"--model_file {model_file}: unpickling a whole model runs code from the file; pass "
                            "--trust_model_file true if you made it, or give --weights (a state_dict) and --model")
        if weights:
            raise UserError("give --weights or --model_file, not both")
        spec = canonical_spec(PICKLED + str(model_file))
        return spec, load_pickled_model(spec[len(PICKLED):])
    if not model or not weights:
        raise UserError("give --model (a registered name, module:function or file.py:function) and --weights (its "
                        "state_dict file), or --model_file with --trust_model_file true")
    if model in MODELS:
        spec, network = model, build_model(model, num_classes, img_size)
    elif is_user_model(model):
        spec = canonical_spec(model)
        network = build_user_model(spec, num_classes, img_size)
    else:
        canonical_spec(model)  # one clear error naming the accepted forms
    load_weights(network, read_state_dict(weights), f"--weights {weights}")
    return spec, network


def _class_label(name, class_names, num_classes, where):
    if class_names is not None and name in class_names:
        return class_names.index(name)
    if name.isdigit() and int(name) < num_classes:
        return int(name)
    raise UserError(f"{where}: class folder {name!r} is neither a class name of the clean data nor a label in "
                    f"[0, {num_classes})")


def poisoned_folder_samples(folder, clean, test, target):
    """PoisonedSamples from a folder of poisoned test images laid out as <original class>/<file>: each file is the
    poisoned copy of the clean test image with the same class and relative name (an image folder), or of test
    index N when it is named N.<ext> (BackdoorBench's bd_test_dataset layout). Images of the target class are
    left out, as all-to-one bd_test sets do."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"--poisoned_folder {folder} is not a folder")
    by_name = {}
    if clean.name == IMAGE_FOLDER:
        root = image_folder_test_root(clean.data_path)
        paths, _ = image_folder_split(clean.data_path, False, clean.class_names)
        by_name = {path.relative_to(root).with_suffix("").as_posix(): index for index, path in enumerate(paths)}
    num_classes, img_size = clean.info.num_classes, clean.info.img_size
    entries = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS):
        relative = path.relative_to(folder)
        if len(relative.parts) < 2:
            raise UserError(f"poisoned image {path} is not inside a class folder (<class>/<file>)")
        label = _class_label(relative.parts[0], clean.class_names, num_classes, path)
        key = Path(clean.class_names[label] if clean.class_names else relative.parts[0], *relative.parts[1:])
        index = by_name.get(key.with_suffix("").as_posix())
        if index is None and path.stem.isdigit():
            index = int(path.stem)
        if index is None or not 0 <= index < len(test):
            raise UserError(f"poisoned image {path} matches no clean test image: name it like the clean test image "
                            f"it was made from, or <test index>.png (0 <= index < {len(test)})")
        if int(test.labels[index]) != label:
            raise UserError(f"poisoned image {path} sits in class {label}, but clean test image {index} has label "
                            f"{int(test.labels[index])}")
        entries.append((index, label, path))
    if not entries:
        raise UserError(f"--poisoned_folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    indices = [index for index, _, _ in entries]
    if len(set(indices)) != len(indices):
        raise UserError(f"--poisoned_folder {folder} holds two images of the same clean test image")
    kept = sorted((index, label, path) for index, label, path in entries if label != target)
    if not kept:
        raise UserError(f"every image in --poisoned_folder {folder} is of the target class {target}: no backdoor "
                        "test set is left")
    images = np.stack([read_image(path, img_size) for _, _, path in kept])
    return PoisonedSamples(indices=np.array([k[0] for k in kept], dtype=np.int64), images=images,
                           bd_labels=np.full(len(kept), target, dtype=np.int64),
                           original_labels=np.array([k[1] for k in kept], dtype=np.int64),
                           split_size=len(test)), len(entries) - len(kept)


def triggered_test_samples(test, trigger_name, target):
    """All-to-one bd_test: every clean test image whose label is not `target`, with the trigger stamped on."""
    apply = trigger(trigger_name).apply
    indices = np.flatnonzero(test.labels != target).astype(np.int64)
    if not len(indices):
        raise UserError(f"every clean test image has the target label {target}: no backdoor test set is left")
    return PoisonedSamples(indices=indices, images=apply(test.images(indices)),
                           bd_labels=np.full(len(indices), target, dtype=np.int64),
                           original_labels=np.asarray(test.labels[indices], dtype=np.int64), split_size=len(test))


def make_own_record(output, *, model, weights=None, model_file=None, trust_model_file=False, clean_data,
                    mean=None, std=None, img_size=None, trigger_name=None, poisoned_folder=None, target,
                    dataset_path="data", log=print):
    """Write the record folder `output` (never over an existing one; built aside and moved into place) from the
    user's pieces. Returns (the record folder, the model_name written: what a defense's --model must name)."""
    output = Path(output)
    if (trigger_name is None) == (poisoned_folder is None):
        raise UserError("give the backdoor test set as --trigger NAME or --poisoned_folder DIR (one of them); "
                        f"triggers: {', '.join(sorted(TRIGGERS))}")
    if trigger_name is not None:
        trigger(trigger_name)  # an unknown name fails now, before anything is read
    clean = resolve_clean_data(clean_data, img_size, mean, std)
    info = clean.info
    mean, std = checked_normalization(mean, std, info.img_size[2])
    if not isinstance(target, int) or not 0 <= target < info.num_classes:
        raise UserError(f"--target must be a label in [0, {info.num_classes}), got {target}")
    spec, network = build_own_model(model, weights, model_file, trust_model_file, num_classes=info.num_classes,
                                    img_size=info.img_size)
    if check_outputs(network, info.num_classes, info.img_size, f"model {spec}"):
        log("the model outputs probabilities (rows sum to 1): defenses will train and score on their logarithm")

    test = clean.split(False, dataset_path)
    if trigger_name is not None:
        bd_test, dropped = triggered_test_samples(test, trigger_name, target), 0
    else:
        bd_test, dropped = poisoned_folder_samples(poisoned_folder, clean, test, target)
    if dropped:
        log(f"left out {dropped} poisoned images of the target class {target} (all-to-one bd_test holds none)")
    record_name = output.name
    result = {
        "model_name": spec,
        "num_classes": int(info.num_classes),
        "model": {key: value.detach().cpu().contiguous().clone() for key, value in network.state_dict().items()},
        "data_path": clean.data_path,
        "img_size": tuple(int(v) for v in info.img_size),
        "clean_data": clean.name,
        "bd_train": None,
        "bd_test": split_state(bd_test, record_name, "bd_test_dataset", whole_split_index=False),
        "normalization": {"mean": list(mean), "std": list(std)},
    }
    if clean.class_names is not None:
        result["class_names"] = list(clean.class_names)
    source = {"attack": "own_model", "model": spec, "weights": str(weights) if weights else None,
              "trigger": trigger_name, "poisoned_folder": str(poisoned_folder) if poisoned_folder else None,
              "attack_target": int(target), "attack_label_trans": "all2one", "clean_data": clean.name}
    with OutputFolder(output, replace=False, exists_hint=": choose another --name (records are never overwritten)") \
            as out:
        write_split_pngs(out.path / "bd_test_dataset", bd_test)
        torch.save(result, out.path / "attack_result.pt")
        torch.save(source, out.path / "info.pickle")
    log(f"record {output}: {spec} on {clean.name} ({info.img_size[0]}x{info.img_size[1]}x{info.img_size[2]}, "
        f"{info.num_classes} classes), {len(bd_test.indices)} poisoned test images -> label {target}")
    return output, spec
