"""Which samples an attack poisons and what label they get, as BackdoorBench decides it.

- Training split: round(pratio * N) samples drawn uniformly from all samples (all-to-one and all-to-all), or, for
  clean-label attacks, from the target class only (capped at its size); clean-label samples keep their labels.
- Test split (bd_test): all-to-one poisons every test image whose label is not the target; all-to-all every image.
- Labels: all-to-one -> target; all-to-all -> (y + 1) % num_classes.
"""
import numpy as np
import torch

from utils.attack_record import PoisonedSamples
from utils.errors import UserError

LABEL_TRANSFORMS = ("all2one", "all2all")


def backdoor_labels(labels, label_transform, target, num_classes):
    """The labels the attack wants; `labels` a numpy array, or a torch tensor (a batch poisoned while training)."""
    if not isinstance(labels, torch.Tensor):
        labels = np.asarray(labels, dtype=np.int64)
    if label_transform == "all2one":
        return labels * 0 + target
    if label_transform == "all2all":
        return (labels + 1) % num_classes
    raise UserError(f"unknown --attack_label_trans {label_transform!r}; use {' or '.join(LABEL_TRANSFORMS)}")


def train_poison_indices(labels, pratio, target, clean_label, rng):
    """Sorted int64 indices of the training samples to poison."""
    labels = np.asarray(labels)
    if not 0 <= pratio <= 1:
        raise UserError(f"--pratio must be in [0, 1], got {pratio}")
    candidates = np.flatnonzero(labels == target) if clean_label else np.arange(len(labels))
    count = min(int(round(pratio * len(labels))), len(candidates))
    return np.sort(rng.choice(candidates, size=count, replace=False)).astype(np.int64)


def bd_test_indices(labels, label_transform, target):
    """Sorted int64 indices of the test samples in bd_test."""
    labels = np.asarray(labels)
    if label_transform == "all2one":
        return np.flatnonzero(labels != target).astype(np.int64)
    return np.arange(len(labels), dtype=np.int64)


def poison(images, labels, indices, apply_trigger, bd_labels, split_size):
    """PoisonedSamples of `indices`: triggered pixels, backdoor labels, original labels."""
    indices = np.asarray(indices, dtype=np.int64)
    return PoisonedSamples(indices=indices, images=apply_trigger(images[indices]),
                           bd_labels=np.asarray(bd_labels, dtype=np.int64)[indices],
                           original_labels=np.asarray(labels, dtype=np.int64)[indices], split_size=split_size)


def batch_poison_count(pratio, batch_size, generator=None):
    """How many samples of a batch an attack that poisons while training changes: int(pratio * batch_size), or, when
    that is below one, one sample with probability pratio * batch_size (BackdoorBench's generalize_to_lower_pratio),
    so that low poisoning rates still poison pratio of the samples on average."""
    expected = pratio * batch_size
    if expected >= 1:
        return int(expected)
    return int(float(torch.rand(1, generator=generator)) < expected)
