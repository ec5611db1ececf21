"""Seeding, device choice and resource figures."""
import random
import resource
import sys

import numpy as np
import torch

from utils.errors import UserError


def seed_everything(seed, deterministic=True):
    """Seed python `random`, numpy and torch, as BackdoorBench's fix_random does."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def pick_device(requested=None):
    """`requested` ('cpu', 'cuda', 'cuda:1', ...) if usable; by default the GPU when there is one."""
    if requested in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"unknown device {requested!r} (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {requested} asked for, but this machine has no usable CUDA GPU (use --device cpu)")
    return device


def peak_memory_mib():
    """Peak resident memory of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
