"""Backdoor triggers as batched functions on uint8 images (N, H, W, C), one registry.

Defaults follow BackdoorBench: BadNets pastes a 3x3 white patch at the bottom-right corner (pixels where the trigger
image is non-zero are replaced); Blended mixes in a full-size pattern with alpha 0.2; SIG adds a horizontal sinusoid
(delta 40, f 6); WaNet resamples the image along a fixed smooth warping field (k 4, s 0.5); BPP squeezes each
channel to 8 levels (optionally with Floyd-Steinberg dithering). The torch functions below (warp, squeeze_colours)
also poison batches on the fly while WaNet and BPP train. The patterns are generated here (deterministic, nothing
downloaded); `python resource/make_resources.py` writes them as PNGs under resource/ for inspection and for
BackdoorBench itself.
"""
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from utils.registry import Registry

TRIGGERS = Registry("trigger")  # name -> Trigger


@dataclass(frozen=True)
class Trigger:
    name: str
    apply: Callable  # apply(images uint8 NHWC, **options) -> poisoned uint8 NHWC
    clean_label: bool = False  # poisons only target-class samples and keeps their labels
    description: str = ""


def register_trigger(name, clean_label=False, description=""):
    def decorate(apply):
        TRIGGERS.add(name, Trigger(name, apply, clean_label, description))
        return apply
    return decorate


def trigger(name):
    return TRIGGERS.lookup(name)


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


def as_float_pixels(images):
    """uint8 NHWC numpy -> float32 NCHW torch tensor in [0, 255]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()


def to_uint8_images(pixels):
    """float NCHW torch pixels in [0, 255] -> uint8 NHWC numpy, rounded: a resampled or dithered value of 254.99998
    is 255 (truncation would darken images that the trigger leaves unchanged)."""
    return pixels.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def map_in_chunks(function, images, *more_images, chunk=4096):
    """function(float NCHW pixels, ...) -> float NCHW pixels over uint8 NHWC `images` (and as many arrays more, chunk
    by chunk alongside), a chunk at a time: bounded memory on 50,000 images."""
    parts = [to_uint8_images(function(*(as_float_pixels(array[start:start + chunk])
                                        for array in (images, *more_images))))
             for start in range(0, len(images), chunk)]
    return np.concatenate(parts) if parts else images.copy()


# ---------------------------------------------------------------- WaNet (Nguyen & Tran, ICLR 2021)

def wanet_grids(height, width, k=4, seed=0):
    """BackdoorBench's WaNet grids, seeded: identity_grid (1, H, W, 2), every pixel's own position in [-1, 1]
    (x first, as grid_sample wants), and noise_grid (1, H, W, 2), a k x k uniform random field in [-1, 1] scaled to
    mean absolute value 1, upsampled bicubically to the image size."""
    generator = torch.Generator().manual_seed(int(seed))
    coarse = torch.rand(1, 2, k, k, generator=generator) * 2 - 1
    coarse = coarse / coarse.abs().mean()
    noise_grid = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    rows, cols = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    return torch.stack((cols, rows), 2)[None], noise_grid


def wanet_grid(identity_grid, noise_grid, s=0.5, grid_rescale=1.0):
    """The backdoor warp: every position moved by s * noise / H, rescaled, clamped to [-1, 1] so that sampling
    never leaves the image."""
    height = identity_grid.shape[1]
    return ((identity_grid + s * noise_grid / height) * grid_rescale).clamp(-1, 1)


def noisy_grids(grid, count, generator=None):
    """WaNet's noise mode: `count` copies of the warp grid, each moved by its own uniform noise in [-1, 1] / H."""
    height = grid.shape[1]
    noise = torch.rand(count, *grid.shape[1:], generator=generator).to(grid.device)
    return (grid + (noise * 2 - 1) / height).clamp(-1, 1)


def warp(x, grid):
    """Bilinear resampling of float NCHW `x` at `grid` (1 or N, H, W, 2); corners aligned, as BackdoorBench. Linear
    in the pixels, so it may run on normalised batches as well as on [0, 255] pixels."""
    grid = grid.to(device=x.device, dtype=x.dtype)
    return F.grid_sample(x, grid.expand(len(x), -1, -1, -1), align_corners=True)


@register_trigger("wanet", description="fixed smooth warping field, k 4, s 0.5 (poisons during training)")
def apply_wanet(images, grid=None, k=4, s=0.5, grid_rescale=1.0, seed=0, **_):
    if grid is None:
        grid = wanet_grid(*wanet_grids(images.shape[1], images.shape[2], k, seed), s, grid_rescale)
    return map_in_chunks(lambda pixels: warp(pixels, grid), images)


# ---------------------------------------------------------------- BppAttack (Wang et al., CVPR 2022)

def squeeze_colours(pixels, levels=8, dithering=False):
    """BppAttack's trigger on float NCHW pixels in [0, 255]: every channel value moved to the nearest of `levels`
    evenly spaced values k * 255 / (levels - 1) (rounded to integers), with Floyd-Steinberg error diffusion (7/16
    right, 3/16 down-left, 5/16 down, 1/16 down-right) when `dithering`."""
    def quantise(values):
        return (values * (levels - 1) / 255.0).round().clamp(0, levels - 1) * 255.0 / (levels - 1)

    if not dithering:
        return quantise(pixels).round()
    count, channels, height, width = pixels.shape
    # Pixel (y, x) needs the errors of (y, x-1) and (y-1, x-1..x+1) only, so all pixels with the same x + 2y can be
    # quantised at once. Sheared so that each such wavefront is one slice, `work[t, y]` holds pixel (y, t - 2y) of
    # every image and channel: 94 vectorised steps for 32x32 instead of 1024 per image.
    steps = width + 2 * (height - 1)
    flat = pixels.float().permute(2, 3, 0, 1).reshape(height, width, count * channels)
    work = pixels.new_zeros((steps + 3, height + 1, count * channels), dtype=torch.float32)
    inside = torch.zeros(steps, height, 1, dtype=torch.float32, device=pixels.device)
    for y in range(height):
        work[2 * y:2 * y + width, y] = flat[y]
        inside[2 * y:2 * y + width, y] = 1.0
    for t in range(steps):
        old = work[t, :height].clone()
        work[t, :height] = quantise(old)
        error = (old - work[t, :height]) * inside[t]  # cells outside the image pass no error on
        work[t + 1, :height] += error * (7 / 16)
        work[t + 1, 1:] += error * (3 / 16)
        work[t + 2, 1:] += error * (5 / 16)
        work[t + 3, 1:] += error * (1 / 16)
    out = torch.stack([work[2 * y:2 * y + width, y] for y in range(height)])
    return out.reshape(height, width, count, channels).permute(2, 3, 0, 1).round().to(pixels.dtype)


@register_trigger("bpp", description="colour depth squeezed to 8 levels per channel (poisons during training)")
def apply_bpp(images, squeeze_num=8, dithering=False, **_):
    return map_in_chunks(lambda pixels: squeeze_colours(pixels, squeeze_num, dithering), images)
