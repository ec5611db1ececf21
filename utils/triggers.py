"""Backdoor triggers as batched functions on uint8 images (N, H, W, C), one registry.

Defaults follow BackdoorBench: BadNets pastes a 3x3 white patch at the bottom-right corner (pixels where the trigger
image is non-zero are replaced); Blended mixes in a full-size pattern with alpha 0.2; SIG adds a horizontal sinusoid
(delta 40, f 6). The patterns are generated here (deterministic, nothing downloaded); `python resource/make_resources.py`
writes them as PNGs under resource/ for inspection and for BackdoorBench itself.
"""
from dataclasses import dataclass
from typing import Callable

import numpy as np

from utils.errors import UserError

TRIGGERS = {}


@dataclass(frozen=True)
class Trigger:
    name: str
    apply: Callable  # apply(images uint8 NHWC, **options) -> poisoned uint8 NHWC
    clean_label: bool = False  # poisons only target-class samples and keeps their labels
    description: str = ""


def register_trigger(name, clean_label=False, description=""):
    def decorate(apply):
        TRIGGERS[name] = Trigger(name, apply, clean_label, description)
        return apply
    return decorate


def trigger(name):
    if name not in TRIGGERS:
        raise UserError(f"unknown trigger {name!r}; registered: {', '.join(sorted(TRIGGERS))}")
    return TRIGGERS[name]


def badnet_trigger_image(height, width, channels, size=3):
    """BackdoorBench's resource/badnet/trigger_image.png: black, with a size x size white square bottom-right."""
    image = np.zeros((height, width, channels), dtype=np.uint8)
    image[height - size:, width - size:, :] = 255
    return image


@register_trigger("badnet", description="3x3 white patch at the bottom-right corner")
def apply_badnet(images, trigger_image=None, **_):
    _, height, width, channels = images.shape
    pattern = badnet_trigger_image(height, width, channels) if trigger_image is None else trigger_image
    mask = pattern.sum(axis=-1, keepdims=True) > 0  # BackdoorBench replaces the pixels where the trigger is non-zero
    return np.where(mask[None], pattern[None], images).astype(np.uint8)


def blended_pattern(height, width, channels, seed=20240501):
    """The blend pattern: a fixed, seeded, smooth colour texture (low-frequency noise upsampled bilinearly), in
    place of BackdoorBench's hello-kitty photo, which we may not ship. Full-size and image-like, as the attack needs."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(8, 8, channels))
    rows = np.linspace(0, 7, height)
    cols = np.linspace(0, 7, width)
    r0, c0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
    r1, c1 = np.minimum(r0 + 1, 7), np.minimum(c0 + 1, 7)
    fr, fc = (rows - r0)[:, None, None], (cols - c0)[None, :, None]
    top = coarse[r0][:, c0] * (1 - fc) + coarse[r0][:, c1] * fc
    bottom = coarse[r1][:, c0] * (1 - fc) + coarse[r1][:, c1] * fc
    return np.clip(np.rint(top * (1 - fr) + bottom * fr), 0, 255).astype(np.uint8)


@register_trigger("blended", description="full-image blend with a fixed pattern, alpha 0.2")
def apply_blended(images, alpha=0.2, pattern=None, **_):
    _, height, width, channels = images.shape
    pattern = blended_pattern(height, width, channels) if pattern is None else pattern
    mixed = (1 - alpha) * images.astype(np.float64) + alpha * pattern[None].astype(np.float64)
    return to_uint8(mixed)


def sig_signal(height, width, channels, delta=40, frequency=6):
    """SIG's horizontal sinusoid: delta * sin(2 pi j f / width) for column j, the same on every row and channel."""
    columns = np.arange(width)
    signal = delta * np.sin(2 * np.pi * columns * frequency / width)
    return np.broadcast_to(signal[None, :, None], (height, width, channels))


@register_trigger("sig", clean_label=True, description="additive sinusoid, delta 40, f 6 (clean-label)")
def apply_sig(images, delta=40, frequency=6, **_):
    _, height, width, channels = images.shape
    added = images.astype(np.float64) + sig_signal(height, width, channels, delta, frequency)[None]
    return to_uint8(added)


def to_uint8(values):
    """Clip to [0, 255] and truncate, as BackdoorBench's np.uint8(np.clip(...)) does."""
    return np.clip(values, 0, 255).astype(np.uint8)
