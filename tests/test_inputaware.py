"""Input-aware attack pieces: the generator networks, the trigger formula (apply / cross), the two training phases
and the options. The attack end to end (record, PNGs reproduced from netCGM.pt) is in test_attacks.py."""
import argparse
import logging

import numpy as np
import pytest
import torch

from helpers import load_script
from utils.generators import diversity_loss, input_aware_generators, threshold
from utils.models import build_model
from utils.triggers import to_uint8

inputaware = load_script("attack/inputaware.py")
QUIET = logging.getLogger("test_inputaware")


def _options(**changes):
    defaults = vars(inputaware.parse_args(["--save_folder_name", "unused"]))  # every default, from the YAML files
    values = {**defaults, "dataset": "cifar10", "eval_batch_size": 32, "random_seed": 0,
              "pratio": 0.1, "attack_target": 0, "attack_label_trans": "all2one", "amp": False, "epochs": 1,
              "batch_size": 32, "lr": 0.05, "lr_scheduler": "none", "mask_epochs": 1.0, "crop_padding": 4}
    values.update(changes)
    values["mask_epochs"] = float(values["mask_epochs"])
    return argparse.Namespace(**values)


def _images(count, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)


def _force_mask(attack, value):
    """Make the mask generator output `value` (0 or 1) everywhere: its last batch norm emits a huge constant."""
    last = attack.netM.convblock_up_5.batch_norm
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(100.0 if value else -100.0)


def _calibrate(network, images, attack):
    """Batch-norm running statistics from one batch, so that an untrained generator's eval-mode output varies with
    its input (with the initial statistics it saturates to the same pattern for every image)."""
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - torch.tensor(attack.info.mean).view(1, 3, 1, 1)) \
        / torch.tensor(attack.info.std).view(1, 3, 1, 1)
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average: after one batch, that batch's statistics
    with torch.no_grad():
        network.train()(x)
    return x


def test_generator_shapes_ranges_and_backdoorbench_names():
    pattern, mask = input_aware_generators("cifar10", 3)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        p, m = pattern.eval()(x), mask.eval()(x)
    assert p.shape == (5, 3, 32, 32) and m.shape == (5, 1, 32, 32)
    assert 0 <= float(p.min()) and float(p.max()) <= 1 and 0 <= float(m.min()) and float(m.max()) <= 1
    t = threshold(torch.linspace(-3, 3, 101))
    assert 0 <= float(t.min()) and float(t.max()) <= 1 and float(threshold(torch.tensor(0.2))) < 0.01
    keys = set(pattern.state_dict())
    assert {"convblock_down_0.conv2d.weight", "convblock_middle.batch_norm.running_mean",
            "convblock_up_5.conv2d.weight"} <= keys and len(keys) == 91
    assert mask.convblock_up_5.conv2d.out_channels == 1 and pattern.convblock_down_5.conv2d.out_channels == 128
    grey_pattern, grey_mask = input_aware_generators("mnist", 1)  # BackdoorBench's smaller MNIST layout
    assert grey_pattern.eval()(torch.randn(2, 1, 28, 28)).shape == (2, 1, 28, 28)
    assert grey_mask.convblock_down_0.conv2d.out_channels == 16 and not hasattr(grey_mask, "convblock_up_4")


def test_diversity_loss_is_small_for_diverse_outputs():
    a, b = torch.zeros(4, 3, 8, 8), torch.ones(4, 3, 8, 8)
    assert float(diversity_loss(a, b, a[:, :1], b[:, :1])) == pytest.approx(1.0, rel=1e-5)
    assert float(diversity_loss(a, b, a[:, :1], a[:, :1] + 0.01)) == pytest.approx(100.0, rel=1e-3)
    same = torch.zeros(4, 1, 8, 8, requires_grad=True)  # two identical (saturated) masks: finite, no NaN gradient
    loss = diversity_loss(a, b, same, torch.zeros(4, 1, 8, 8))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(same.grad).all()


def test_apply_with_an_all_zero_mask_returns_the_clean_image():
    attack = inputaware.InputAware(_options())
    _force_mask(attack, 0)
    images = _images(16)
    assert np.array_equal(attack.apply(images), images)
    assert np.array_equal(attack.cross(images), images)


def test_apply_with_a_full_mask_is_the_pattern_and_cross_takes_another_images():
    attack = inputaware.InputAware(_options())
    _force_mask(attack, 1)
    images = _images(16)
    x = _calibrate(attack.netG, images, attack)
    stamped = attack.apply(images)
    with torch.no_grad():
        expected = to_uint8(attack.netG.eval()(x).permute(0, 2, 3, 1).numpy() * 255)
    assert np.abs(stamped.astype(int) - expected).max() <= 1 and not np.array_equal(stamped, images)
    crossed = attack.cross(images).astype(int)
    distance = np.abs(crossed[:, None] - stamped[None].astype(int)).max(axis=(2, 3, 4))
    # every image carries the trigger made for one other image (to within truncation), never its own
    assert (distance.min(axis=1) <= 1).all() and (np.diag(distance) > 1).all()
    assert sorted(distance.argmin(axis=1).tolist()) == list(range(len(images)))


def test_mask_pretraining_makes_the_mask_sparse():
    # The generators' initial weights come from torch's global RNG, which the script seeds (seed_everything) and a
    # test run leaves wherever earlier tests left it; four Adam steps halve the mask for 38 of 40 initial seeds
    # (measured), so the test fixes its own instead of depending on the order tests run in.
    torch.manual_seed(0)
    options = _options(mask_epochs=1, lambda_div=0.0, batch_size=16)
    attack = inputaware.InputAware(options)
    images = _images(64)
    x = _calibrate(attack.netM, images[:16], attack)

    def mean_mask():  # with the batch's own statistics: the running ones barely move in four steps
        with torch.no_grad():
            return float(threshold(attack.netM.train()(x)).mean())
    before = mean_mask()
    attack.train(build_model("airbench_cpu", 10), images, np.arange(64) % 10, options, "cpu", QUIET)
    assert mean_mask() < before / 2


def test_joint_training_trains_the_pattern_generator_and_leaves_the_mask_frozen():
    options = _options(mask_epochs=0, epochs=2)
    attack = inputaware.InputAware(options)
    mask_before = {k: v.clone() for k, v in attack.netM.state_dict().items()}
    pattern_before = {k: v.clone() for k, v in attack.netG.state_dict().items()}
    rows = attack.train(build_model("airbench_cpu", 10), _images(96), np.arange(96) % 10, options, "cpu", QUIET)
    assert [row["epoch"] for row in rows] == [0, 1] and all(row["batches"] == 3 for row in rows)
    assert all(0 <= row["train_asr_bd_only"] <= 1 and np.isfinite(row["loss"]) for row in rows)
    assert all(torch.equal(mask_before[k], v) for k, v in attack.netM.state_dict().items())
    assert not torch.equal(pattern_before["convblock_down_0.conv2d.weight"], attack.netG.convblock_down_0.conv2d.weight)


def test_generators_round_trip_through_netcgm(tmp_path):
    attack = inputaware.InputAware(_options())
    attack.extra_files(tmp_path)
    state = torch.load(tmp_path / "netCGM.pt", weights_only=True)
    assert {"netG", "netM", "epoch"} <= set(state)
    images = _images(20)
    again = inputaware.InputAware(_options(random_seed=5)).load_generators(tmp_path / "netCGM.pt")
    assert np.array_equal(again.apply(images), attack.apply(images))


def test_default_yaml_holds_backdoorbench_values_and_its_option_name_works(tmp_path):
    args = inputaware.parse_args(["--bd_yaml_path", "config/attack/inputaware/default.yaml", "--save_folder_name",
                                  "x"])
    assert (args.mask_epochs, args.lambda_norm, args.lambda_div, args.mask_density) == (25, 100, 1, 0.032)
    assert args.schedulerM_milestones == [10, 20] and args.lr_G == args.lr_M == 0.01 and args.EPSILON == 1e-7
    backdoorbench_yaml = tmp_path / "bb.yaml"
    backdoorbench_yaml.write_text("clean_train_epochs: 3\n")
    args = inputaware.parse_args(["--bd_yaml_path", str(backdoorbench_yaml), "--save_folder_name", "x"])
    assert args.mask_epochs == 3
    assert inputaware.parse_args(["--save_folder_name", "x", "--clean_train_epochs", "2"]).mask_epochs == 2
