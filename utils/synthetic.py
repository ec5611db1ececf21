"""Small stand-ins made on the spot, for tests and the record fuzzer: a CIFAR-10 in its official on-disk layout and
a tiny BackdoorBench v2 record on it (BadNets trigger, an untrained model). Nothing here is downloaded."""
import pickle

import numpy as np
import torch

from utils.attack_record import PoisonedSamples, new_record_folder, write_attack_record
from utils.models import build_model, cpu_state_dict
from utils.triggers import TRIGGERS


def write_synthetic_cifar10(folder, train_per_batch=40, test_count=60, seed=0):
    """A small CIFAR-10 in the official layout (cifar-10-batches-py/, five training batches and test_batch) with
    random pixels and labels cycling through the classes. Returns (train images NHWC, train labels, test images,
    test labels)."""
    rng = np.random.default_rng(seed)
    root = folder / "cifar-10-batches-py"
    root.mkdir(parents=True)
    arrays = []
    for name, count in [(f"data_batch_{i}", train_per_batch) for i in range(1, 6)] + [("test_batch", test_count)]:
        data = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
        labels = (np.arange(count) + len(arrays)) % 10
        with open(root / name, "wb") as handle:
            pickle.dump({"batch_label": name, "labels": [int(x) for x in labels], "data": data,
                         "filenames": [f"{name}_{i}.png" for i in range(count)]}, handle, protocol=2)
        arrays.append((data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels))
    train_x = np.concatenate([a[0] for a in arrays[:5]])
    train_y = np.concatenate([a[1] for a in arrays[:5]])
    return train_x, train_y, arrays[5][0], arrays[5][1]


def _poisoned(images, labels, indices, target):
    apply = TRIGGERS["badnet"].apply
    return PoisonedSamples(indices=np.asarray(indices, dtype=np.int64), images=apply(images[indices]),
                           bd_labels=np.full(len(indices), target, dtype=np.int64),
                           original_labels=np.asarray(labels[indices], dtype=np.int64), split_size=len(labels))


def write_tiny_record(record_dir, name, cifar10, model_name="airbench_cpu", target=0, seed=0, bd_test_count=None):
    """record_dir/name: a v2 record (as our attacks write it) on the arrays write_synthetic_cifar10 returned:
    an untrained `model_name`, 10% of the training set poisoned with the BadNets trigger, bd_test = the test
    samples not of class `target` (the first bd_test_count of them). Returns the record folder."""
    train_x, train_y, test_x, test_y = cifar10
    rng = np.random.default_rng(seed)
    candidates = np.flatnonzero(train_y != target)
    bd_train = _poisoned(train_x, train_y, np.sort(rng.choice(candidates, max(1, len(train_y) // 10), replace=False)),
                         target)
    bd_test = _poisoned(test_x, test_y, np.flatnonzero(test_y != target)[:bd_test_count], target)
    torch.manual_seed(seed)
    model = build_model(model_name, 10, (32, 32, 3))
    with new_record_folder(record_dir / name) as out:
        write_attack_record(out.path, name, model_name=model_name, num_classes=10, state_dict=cpu_state_dict(model),
                            clean_data="cifar10", img_size=(32, 32, 3), bd_train=bd_train, bd_test=bd_test,
                            info={"attack": "badnet", "pratio": 0.1, "attack_target": target})
    return record_dir / name
