"""What every attack script does: options, clean data, poisoning, training, evaluation and the record.

BackdoorBench's command line: `python attack/badnet.py --yaml_path config/attack/prototype/cifar10.yaml
--bd_yaml_path config/attack/badnet/default.yaml --save_folder_name badnet_0_1` (command line > attack YAML >
prototype YAML > defaults). The record is written to record/<save_folder_name>/ and never overwrites one.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from utils.attack_record import PoisonedSamples, new_record_folder, write_attack_record
from utils.config import REPO_ROOT, parse_config, read_defaults, show_defaults, str2bool
from utils.datasets import CleanSplit, dataset_info
from utils.errors import UserError
from utils.models import build_model, cpu_state_dict
from utils.precision import amp_option, resolve_amp
from utils.poisoning import (LABEL_TRANSFORMS, backdoor_labels, batch_poison_count, bd_test_indices, poison,
                             train_poison_indices)
from utils.reporting import plot_epochs, setup_logger, write_epoch_csvs, write_json
from utils.runtime import peak_memory_mib, pick_device, seed_everything
from utils.tensor_data import Augmentation, DeviceImages
from utils.training import EvalSets, accuracy, evaluate, prepare_model, train_classifier

ATTACK_COLUMNS = ["epoch", "batch", "train_epoch_loss_avg_over_batch", "train_acc", "train_acc_clean_only",
                  "train_asr_bd_only", "train_ra_bd_only", "clean_test_loss_avg_over_batch",
                  "bd_test_loss_avg_over_batch", "test_acc", "test_asr", "test_ra"]

ATTACK_CONFIGS = REPO_ROOT / "config" / "attack"


def attack_parser(description):
    parser = argparse.ArgumentParser(description=description)
    add = parser.add_argument
    add("--yaml_path", type=str, help="prototype YAML (training recipe), e.g. config/attack/prototype/cifar10.yaml")
    add("--bd_yaml_path", type=str, help="attack YAML, e.g. config/attack/badnet/default.yaml")
    add("--save_folder_name", type=str, metavar="NAME", help="(required) record/NAME/ (never overwritten)")
    add("--record_dir", type=str, help="where record folders go")
    add("--dataset", type=str, help="clean dataset: cifar10, cifar100, gtsrb, tiny, mnist")
    add("--dataset_path", type=str, help="folder holding <dataset>/")
    add("--download", type=str2bool, help="download the clean dataset if it is missing (cifar10/100, mnist)")
    add("--model", type=str, help="registered model name (utils/models.py)")
    add("--epochs", type=int, help="training epochs")
    add("--batch_size", type=int, help="training batch size")
    add("--lr", type=float, help="SGD learning rate (peak of OneCycle)")
    add("--lr_scheduler", type=str, choices=["CosineAnnealingLR", "OneCycle", "none"],
        help="learning-rate schedule: CosineAnnealingLR per epoch (BackdoorBench), OneCycle per batch, or none")
    add("--warmup_epochs", type=float, help="OneCycle: epochs of linear warm-up")
    add("--sgd_momentum", type=float, help="SGD momentum")
    add("--nesterov", type=str2bool, help="Nesterov momentum")
    add("--wd", type=float, help="weight decay")
    add("--label_smoothing", type=float, help="label smoothing of the training loss")
    add("--crop_padding", type=int, help="random-crop padding of the training augmentation (BackdoorBench: 4)")
    add("--amp", type=amp_option, metavar="{auto,true,false}",
        help="autocast: auto (float16 on CUDA, bfloat16 only on CPUs that run it natively), true or false")
    add("--random_seed", type=int, help="seed of python, numpy and torch (and of the poisoned samples)")
    add("--pratio", type=float, help="share of the training set poisoned")
    add("--attack_target", type=int, help="target label (all2one)")
    add("--attack_label_trans", type=str, choices=LABEL_TRANSFORMS)
    add("--device", type=str, help="cpu, cuda, cuda:N (default: cuda when available)")
    add("--eval_batch_size", type=int, help="batch size of the final evaluation")
    add("--num_workers", type=int, help="accepted for BackdoorBench compatibility; data lives on the device")
    add("--progress", type=str2bool, help="show a progress bar")
    return parser


def attack_defaults(parser, attack):
    """Every default of `attack`, from YAML only: config/attack/common.yaml, then config/attack/<attack>/default.yaml
    when the attack has one (the clean prototype has none); each value converted with its option's type."""
    own = ATTACK_CONFIGS / attack / "default.yaml"
    return read_defaults(parser, [ATTACK_CONFIGS / "common.yaml"] + ([own] if own.is_file() else []))


def parse_attack_args(parser, argv, attack):
    """The options of a run of `attack`: command line > --bd_yaml_path > --yaml_path > its default.yaml > common."""
    defaults = attack_defaults(parser, attack)
    show_defaults(parser, defaults)  # --help tells what a run would use
    args = parse_config(parser, argv, defaults, yaml_options=("yaml_path", "bd_yaml_path"))
    if not args.save_folder_name:
        raise UserError("--save_folder_name is required (the record folder name under record/)")
    if Path(args.save_folder_name).name != args.save_folder_name:
        raise UserError("--save_folder_name must be a plain folder name, not a path")
    info = dataset_info(args.dataset)
    if not 0 <= args.attack_target < info.num_classes:
        raise UserError(f"--attack_target must be in [0, {info.num_classes}) for {args.dataset}")
    if args.epochs < 1:
        raise UserError("--epochs must be at least 1")
    if args.crop_padding < 0:
        raise UserError("--crop_padding must be 0 or more")
    return args


def train_set_with_poison(train_images, train_labels, bd_train):
    """The training set the attacker trains on: poisoned pixels and labels substituted at their indices."""
    images, labels = train_images.copy(), np.asarray(train_labels, dtype=np.int64).copy()
    images[bd_train.indices] = bd_train.images
    labels[bd_train.indices] = bd_train.bd_labels
    return images, labels


def train_on(model, images, labels, args, device, logger, poison_batch=None):
    """Train `model` (on `device`) on uint8 NHWC `images` with the recipe in `args`, BackdoorBench's random crop and
    flip done batched on the device; poison_batch(x, y, data) -> (x, y), if given, changes every augmented,
    normalised batch (`data`, the training DeviceImages, converts to and from pixels). Returns the epoch rows."""
    info = dataset_info(args.dataset)
    data = DeviceImages(images, labels, device, info.mean, info.std)
    augmentation = Augmentation(crop_padding=args.crop_padding, flip=info.random_flip)
    generator = torch.Generator().manual_seed(args.random_seed)
    transform = None if poison_batch is None else (lambda x, y: poison_batch(x, y, data))
    return train_classifier(model, data, args, augmentation, generator, logger, batch_transform=transform)


class DynamicAttack:
    """An attack that poisons while the model trains (WaNet, BPP, Input-aware).

    run_attack(args, dynamic=attack) trains with `train` instead of on a poisoned copy of the training set, and after
    training builds the record's bd_train and bd_test with `apply` and cross_test_dataset/ with `cross`. The default
    `train` follows BackdoorBench's batch layout: in every (shuffled) batch the first pratio * batch samples get the
    trigger and the backdoor label, the next `kept_count` get a perturbation that keeps their labels (WaNet's noise
    mode, BPP's negative samples), the rest stay clean. Subclasses give `trigger_batch`, `perturb_batch` and
    `kept_count`, or override `train` (or `poison_batch`) altogether.
    """
    name = "dynamic"
    clean_label = False

    def __init__(self, args=None):
        self.args = args  # the merged options (pratio, attack_target, attack_label_trans, random_seed, ...)

    def train(self, model, train_images, train_labels, args, device, logger):
        """Train `model` (already on `device`) on the clean uint8 NHWC numpy `train_images` and int64 `train_labels`,
        poisoning batches on the fly; return per-epoch dicts with keys epoch, batches, loss, train_acc
        (the shape utils.training.train_classifier returns)."""
        return train_on(model, train_images, train_labels, args, device, logger, poison_batch=self.poison_batch)

    def apply(self, images):
        """Poisoned uint8 NHWC numpy images (after training; used for bd_train/bd_test in the record)."""
        raise NotImplementedError

    def cross(self, images):
        """Noise-mode ("cross") images for cross_test_dataset, or None when the attack has none."""
        return None

    def extra_files(self, folder):
        """Write attack-specific files into the record folder (WaNet: state_dict.pt); default nothing."""

    # ---- optional members behind the default train()

    @property
    def batch_generator(self):
        """The torch.Generator (CPU) of the batch poisoning's random choices: its own stream, seeded from
        --random_seed, apart from the shuffling and augmentation stream."""
        if getattr(self, "_batch_generator", None) is None:
            self._batch_generator = torch.Generator().manual_seed(self.args.random_seed + 1)
        return self._batch_generator

    def poison_batch(self, x, y, data):
        """A normalised float NCHW batch `x` on the device and its labels `y` -> the batch the model trains on."""
        args = self.args
        count = batch_poison_count(args.pratio, len(y), self.batch_generator)
        kept = max(0, min(self.kept_count(count, len(y)), len(y) - count))
        triggered = self.trigger_batch(x[:count], data)
        perturbed = self.perturb_batch(x[count:count + kept], data)
        bd_labels = backdoor_labels(y[:count], args.attack_label_trans, args.attack_target,
                                    dataset_info(args.dataset).num_classes)
        return torch.cat([triggered, perturbed, x[count + kept:]]), torch.cat([bd_labels, y[count:]])

    def kept_count(self, poisoned, batch_size):
        """How many samples after the poisoned ones get the label-keeping perturbation."""
        return 0

    def trigger_batch(self, x, data):
        """The trigger on normalised samples of a training batch (`data.pixels` / `data.from_pixels` convert)."""
        raise NotImplementedError

    def perturb_batch(self, x, data):
        """The label-keeping perturbation on normalised samples of a training batch."""
        return x


def poisoned_splits(apply_trigger, clean_label, args, train, train_images, test, test_images, rng, logger):
    """bd_train (round(pratio * N) samples by utils.poisoning's rule) and bd_test as PoisonedSamples."""
    num_classes = dataset_info(args.dataset).num_classes
    train_bd_labels = train.labels if clean_label else backdoor_labels(
        train.labels, args.attack_label_trans, args.attack_target, num_classes)
    chosen = train_poison_indices(train.labels, args.pratio, args.attack_target, clean_label, rng)
    bd_train = poison(train_images, train.labels, chosen, apply_trigger, train_bd_labels, len(train))
    test_bd_labels = backdoor_labels(test.labels, args.attack_label_trans, args.attack_target, num_classes)
    bd_test = poison(test_images, test.labels, bd_test_indices(test.labels, args.attack_label_trans,
                                                                args.attack_target),
                     apply_trigger, test_bd_labels, len(test))
    logger.info(f"poisoned {len(bd_train.indices)} of {len(train)} training samples; bd_test holds "
                f"{len(bd_test.indices)} test samples")
    return bd_train, bd_test


def run_attack(args, apply_trigger=None, clean_label=False, attack_name="prototype", dynamic=None):
    """Poison, train, evaluate and write the record. With `apply_trigger` the training set is poisoned before
    training; with `dynamic` (a DynamicAttack) batches are poisoned while training and the record's poisoned sets
    are made after it; with neither, clean training (clean_model.pth)."""
    if dynamic is not None:
        apply_trigger, clean_label, attack_name = dynamic.apply, dynamic.clean_label, dynamic.name
    started = time.perf_counter()
    seed_everything(args.random_seed)
    device = pick_device(args.device)
    args.amp, precision = resolve_amp(args.amp, device)
    info = dataset_info(args.dataset)
    final = Path(args.record_dir) / args.save_folder_name
    with new_record_folder(final) as out:
        logger = setup_logger(out.path, attack_name, subfolder="")
        logger.info(f"{attack_name} -> {final} on {device}; options: {vars(args)}")
        logger.info(precision)
        train = CleanSplit(args.dataset, args.dataset_path, train=True, download=args.download)
        test = CleanSplit(args.dataset, args.dataset_path, train=False)
        train_images, test_images = train.images(), test.images()
        rng = np.random.default_rng(args.random_seed)

        def make_poisoned_splits():
            return poisoned_splits(apply_trigger, clean_label, args, train, train_images, test, test_images, rng,
                                   logger)

        bd_train = bd_test = cross_test = None
        train_x, train_y = train_images, train.labels
        if apply_trigger is not None and dynamic is None:
            bd_train, bd_test = make_poisoned_splits()
            train_x, train_y = train_set_with_poison(train_images, train.labels, bd_train)

        model = prepare_model(build_model(args.model, info.num_classes, info.img_size), device)
        tick = time.perf_counter()
        if dynamic is None:
            epochs = train_on(model, train_x, train_y, args, device, logger)
        else:
            epochs = dynamic.train(model, train_images, train.labels, args, device, logger)
        train_seconds = time.perf_counter() - tick
        if dynamic is not None:
            # after training: an attack may learn its trigger while the model trains (Input-aware)
            bd_train, bd_test = make_poisoned_splits()
            cross_images = dynamic.cross(test_images)
            if cross_images is not None:
                every = np.arange(len(test), dtype=np.int64)
                cross_test = PoisonedSamples(indices=every, images=cross_images, bd_labels=test.labels,
                                             original_labels=test.labels, split_size=len(test))

        clean_test = DeviceImages(test_images, test.labels, device, info.mean, info.std)
        rows = [{"epoch": e["epoch"], "batch": e["batches"], "train_epoch_loss_avg_over_batch": e["loss"],
                 "train_acc": e["train_acc"]} for e in epochs]
        if bd_test is not None:
            bd_test_data = DeviceImages(bd_test.images, bd_test.bd_labels, device, info.mean, info.std,
                                        original=bd_test.original_labels)
            metrics = evaluate(model, EvalSets(clean_test, bd_test_data), args.eval_batch_size, args.progress)
        else:
            metrics = {"test_acc": accuracy(model, clean_test, args.eval_batch_size)}
        if cross_test is not None:  # noise-mode images must keep their labels: BackdoorBench's test_cross_acc
            cross_data = DeviceImages(cross_test.images, cross_test.bd_labels, device, info.mean, info.std)
            metrics["test_cross_acc"] = accuracy(model, cross_data, args.eval_batch_size)
        rows[-1].update(metrics)
        logger.info("final: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

        state_dict = cpu_state_dict(model)
        if bd_train is None:
            torch.save(state_dict, out.path / "clean_model.pth")
        else:
            write_attack_record(out.path, args.save_folder_name, model_name=args.model,
                                num_classes=info.num_classes, state_dict=state_dict, clean_data=args.dataset,
                                img_size=info.img_size, bd_train=bd_train, bd_test=bd_test,
                                info={**vars(args), "attack": attack_name, "num_classes": info.num_classes,
                                      "img_size": info.img_size, "save_path": f"./record/{args.save_folder_name}",
                                      "terminal_info": sys.argv},
                                key_type=np.int64 if dynamic is None else int, cross_test=cross_test)
        if dynamic is not None:
            dynamic.extra_files(out.path)
        table = write_attack_tables(rows, out.path, cross=cross_test is not None)
        plot_epochs(table, out.path)
        seconds = time.perf_counter() - started
        write_json(out.path / "summary.json", {"attack": attack_name, "model": args.model, "dataset": args.dataset,
                                                "device": str(device), "metrics": metrics, "epochs": len(epochs),
                                                "train_seconds": train_seconds, "seconds": seconds,
                                                "peak_memory_mib": peak_memory_mib()})
        parts = [f"{key[5:].upper()} {value:.4f}" for key, value in metrics.items() if key.startswith("test_")]
        logger.info(f"{attack_name}: " + ", ".join(parts) + f", {train_seconds:.1f} s training, {seconds:.1f} s")
    print(f"record in {final}")
    return 0


def write_attack_tables(rows, folder, cross=False):
    """attack_df.csv and attack_df_summary.csv with BackdoorBench's attack columns (and test_cross_acc, as its
    wanet, inputaware and bpp write, with `cross`)."""
    return write_epoch_csvs(rows, folder, "attack_df", columns=ATTACK_COLUMNS + (["test_cross_acc"] if cross else []))
