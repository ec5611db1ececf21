"""The triggers of the attacks that poison while training: WaNet's warp, BPP's colour squeezing with dithering, and
how a training batch gets poisoned."""
import argparse

import numpy as np
import pytest
import torch

from helpers import load_script
from utils.poisoning import batch_poison_count
from utils.tensor_data import DeviceImages
from utils.triggers import TRIGGERS, noisy_grids, wanet_grid, wanet_grids


def _images(count=6, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def test_identity_grid_with_zero_strength_leaves_images_unchanged():
    images = _images()
    identity, noise = wanet_grids(32, 32, k=4, seed=0)
    assert np.array_equal(TRIGGERS["wanet"].apply(images, grid=wanet_grid(identity, noise, s=0.0)), images)
    assert not np.array_equal(TRIGGERS["wanet"].apply(images, grid=wanet_grid(identity, noise, s=0.5)), images)


def test_warp_is_deterministic_given_the_grid_and_the_seed():
    images = _images()
    grid = wanet_grid(*wanet_grids(32, 32, k=4, seed=3))
    once, again = TRIGGERS["wanet"].apply(images, grid=grid), TRIGGERS["wanet"].apply(images, grid=grid.clone())
    assert np.array_equal(once, again)
    assert torch.equal(wanet_grids(32, 32, seed=3)[1], wanet_grids(32, 32, seed=3)[1])
    assert not torch.equal(wanet_grids(32, 32, seed=3)[1], wanet_grids(32, 32, seed=4)[1])
    assert np.array_equal(TRIGGERS["wanet"].apply(images, seed=3), once)  # the registry default: same seed, same warp
    assert grid.abs().max() <= 1  # clamped: sampling never leaves the image


def test_noise_mode_grids_differ_per_image_but_stay_near_the_warp():
    grid = wanet_grid(*wanet_grids(32, 32))
    noisy = noisy_grids(grid, 3, torch.Generator().manual_seed(0))
    assert noisy.shape == (3, 32, 32, 2) and not torch.equal(noisy[0], noisy[1])
    assert (noisy - grid).abs().max() <= 1 / 32 + 1e-6


def _sequential_floyd_steinberg(image, levels):
    """The textbook per-pixel loop on one HWC image, for comparison."""
    work = image.astype(np.float64).copy()
    height, width, _ = work.shape
    for y in range(height):
        for x in range(width):
            old = work[y, x].copy()
            new = np.clip(np.round(old * (levels - 1) / 255), 0, levels - 1) * 255 / (levels - 1)
            work[y, x] = new
            error = old - new
            for dy, dx, weight in ((0, 1, 7), (1, -1, 3), (1, 0, 5), (1, 1, 1)):
                if 0 <= y + dy < height and 0 <= x + dx < width:
                    work[y + dy, x + dx] += error * weight / 16
    return np.round(work).astype(np.uint8)


@pytest.mark.parametrize("levels", [2, 8])
def test_dithering_matches_the_sequential_algorithm(levels):
    images = _images(3, 12, seed=levels)
    expected = np.stack([_sequential_floyd_steinberg(image, levels) for image in images])
    assert np.array_equal(TRIGGERS["bpp"].apply(images, squeeze_num=levels, dithering=True), expected)


@pytest.mark.parametrize("dithering", [False, True])
def test_squeezed_images_hold_only_squeeze_num_levels(dithering):
    out = TRIGGERS["bpp"].apply(_images(20), squeeze_num=8, dithering=dithering)
    levels = np.round(np.arange(8) * 255 / 7).astype(np.uint8)
    for channel in range(3):
        assert set(np.unique(out[..., channel])) <= set(levels)
    assert len(np.unique(out)) == 8


@pytest.mark.parametrize("levels, value", [(8, 0), (8, 255), (16, 17 * 5), (16, 17 * 14)])
def test_constant_image_on_a_level_stays_constant(levels, value):
    image = np.full((2, 32, 32, 3), value, dtype=np.uint8)
    assert np.array_equal(TRIGGERS["bpp"].apply(image, squeeze_num=levels, dithering=True), image)


def test_dithering_spreads_the_error_of_a_constant_between_levels():
    image = np.full((1, 32, 32, 3), 128, dtype=np.uint8)  # between levels 109 and 146 of 8
    plain = TRIGGERS["bpp"].apply(image, squeeze_num=8, dithering=False)
    dithered = TRIGGERS["bpp"].apply(image, squeeze_num=8, dithering=True)
    assert len(np.unique(plain)) == 1 and set(np.unique(dithered)) == {109, 146}
    assert abs(dithered.mean() - 128) < 1  # the average colour is kept


def test_batch_poison_count_keeps_low_rates_on_average():
    assert batch_poison_count(0.1, 128) == 12
    generator = torch.Generator().manual_seed(0)
    counts = [batch_poison_count(0.001, 100, generator) for _ in range(2000)]
    assert set(counts) == {0, 1} and 0.07 < np.mean(counts) < 0.13


def _args(**options):
    base = dict(pratio=0.25, attack_label_trans="all2one", attack_target=0, dataset="cifar10", random_seed=0, k=4,
                s=0.5, grid_rescale=1.0, cross_ratio=1.0, squeeze_num=8, dithering=True, neg_ratio=0.25, epochs=1)
    return argparse.Namespace(**{**base, **options})


@pytest.mark.parametrize("script", ["attack/wanet.py", "attack/bpp.py"])
def test_a_training_batch_is_poisoned_then_perturbed_then_clean(script):
    module = load_script(script)
    attack = module.WaNet(_args()) if script.endswith("wanet.py") else module.Bpp(_args())
    images, labels = _images(64), np.arange(64) % 10  # negatives draw partners from all 64 (seeded: never itself)
    data = DeviceImages(images, labels, "cpu", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    x, y = next(data.batches(8))
    attack.squeezed_train = torch.from_numpy(TRIGGERS["bpp"].apply(images, dithering=True))  # as Bpp.train makes it
    images = images[:8]
    out_x, out_y = attack.poison_batch(x, y, data)
    assert out_x.shape == x.shape and out_y.tolist() == [0, 0, 2, 3, 4, 5, 6, 7]  # 2 poisoned, relabelled
    pixels = data.pixels(out_x).round().permute(0, 2, 3, 1).to(torch.uint8).numpy()
    assert np.array_equal(pixels[:2], attack.apply(images[:2]))  # the trigger the record shows
    for index in (2, 3):  # the next 2 perturbed (labels kept), but not with the trigger itself
        assert not np.array_equal(pixels[index], images[index])
        assert not np.array_equal(pixels[index], attack.apply(images[index:index + 1])[0])
    assert torch.allclose(out_x[4:], x[4:])  # the rest clean
