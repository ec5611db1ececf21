"""Writing attack records exactly as BackdoorBench v2 (V2.2) does, so every reader of the format accepts them.

record/<name>/attack_result.pt (pickle protocol 2, numpy.int64 data_dict keys (plain int for the attacks that
poison while training), paths relative to the BackdoorBench root), bd_train_dataset/ and bd_test_dataset/ PNGs
(<original_label>/<original_index>.png), info.pickle, train_poison_index_list.pickle. The folder is built aside and
moved into place at the end; an existing folder is never overwritten.
"""
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from utils.reporting import OutputFolder


@dataclass
class PoisonedSamples:
    """Poisoned samples of one split: their original indices, poisoned pixels and labels."""
    indices: np.ndarray  # int64 original indices, ascending
    images: np.ndarray  # uint8 (N, H, W, C)
    bd_labels: np.ndarray  # int64
    original_labels: np.ndarray  # int64
    split_size: int  # samples in the whole clean split


def save_png(path, image):
    """Lossless PNG of a uint8 (H, W, C) image (grey when C == 1)."""
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)


def split_state(samples, record_name, folder_name, whole_split_index, key_type=np.int64):
    """BackdoorBench's dataset state dict; `whole_split_index`: bd_train lists every index, bd_test only poisoned;
    `key_type` of the data_dict keys (numpy.int64, or int as BackdoorBench's wanet, inputaware and bpp write)."""
    relative_folder = f"./record/{record_name}/{folder_name}"
    data_dict = {}
    for index, bd_label, original_label in zip(samples.indices, samples.bd_labels, samples.original_labels):
        data_dict[key_type(index)] = {"path": f"{relative_folder}/{int(original_label)}/{int(index)}.png",
                                      "other_info": [int(bd_label), int(original_label)]}
    indicator = np.zeros(samples.split_size, dtype=np.float64)
    indicator[samples.indices] = 1.0
    original_index_array = (np.arange(samples.split_size, dtype=np.int64) if whole_split_index
                            else np.asarray(samples.indices, dtype=np.int64))
    return {"bd_data_container": {"save_folder_path": relative_folder, "data_dict": data_dict,
                                  "save_file_format": ".png"},
            "getitem_all": True, "getitem_all_switch": False, "original_index_array": original_index_array,
            "poison_indicator": indicator, "save_folder_path": relative_folder}


def write_split_pngs(folder, samples):
    for image, index, original_label in zip(samples.images, samples.indices, samples.original_labels):
        target = folder / str(int(original_label))
        target.mkdir(parents=True, exist_ok=True)
        save_png(target / f"{int(index)}.png", image)


def new_record_folder(final):
    """record/<name>/ built aside and renamed into place on success; an existing record is never overwritten."""
    return OutputFolder(final, replace=False,
                        exists_hint=": choose another --save_folder_name (records are never overwritten)")


def write_attack_record(folder, record_name, *, model_name, num_classes, state_dict, clean_data, img_size,
                        bd_train, bd_test, info, data_path=None, key_type=np.int64, cross_test=None):
    """attack_result.pt, the PNG folders, info.pickle and train_poison_index_list.pickle into `folder`; with
    `cross_test` (noise-mode test images at their true labels) also cross_test_dataset/, which BackdoorBench writes
    beside the record but not into attack_result.pt."""
    folder = Path(folder)
    write_split_pngs(folder / "bd_train_dataset", bd_train)
    write_split_pngs(folder / "bd_test_dataset", bd_test)
    if cross_test is not None:
        write_split_pngs(folder / "cross_test_dataset", cross_test)
    model = OrderedDict((key, value.detach().cpu().contiguous().clone()) for key, value in state_dict.items())
    result = {
        "model_name": model_name,
        "num_classes": int(num_classes),
        "model": model,
        "data_path": data_path or f"./data/{clean_data}",
        "img_size": tuple(int(v) for v in img_size),
        "clean_data": clean_data,
        "bd_train": split_state(bd_train, record_name, "bd_train_dataset", whole_split_index=True, key_type=key_type),
        "bd_test": split_state(bd_test, record_name, "bd_test_dataset", whole_split_index=False, key_type=key_type),
    }
    torch.save(result, folder / "attack_result.pt")
    torch.save(info, folder / "info.pickle")
    torch.save(result["bd_train"]["poison_indicator"], folder / "train_poison_index_list.pickle")
    return result
