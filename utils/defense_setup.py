"""What every defense script does before its own algorithm: options, record, data, model, clean subset."""
import argparse
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from utils.config import REPO_ROOT, none_or_str, parse_config, read_defaults, show_defaults, str2bool
from utils.datasets import CleanSplit, dataset_info
from utils.errors import UserError
from utils.models import build_model, load_weights
from utils.precision import amp_option, resolve_amp
from utils.records import load_attack_record
from utils.reporting import read_index
from utils.runtime import pick_device, seed_everything
from utils.tensor_data import Augmentation, DeviceImages
from utils.training import EvalSets, prepare_model


def defense_parser(description):
    """The options every defense shares; each defaults to None so that YAML and defaults can fill it."""
    parser = argparse.ArgumentParser(description=description)
    add = parser.add_argument
    add("--result_file", type=str, metavar="NAME",
        help="(required) record folder name under --record_dir (or a path to the folder)")
    add("--yaml_path", type=str, help="YAML file over the defense's config.yaml (e.g. its <dataset>.yaml); "
        "command-line values override both")
    add("--dataset", type=str, help="clean dataset of the record: cifar10, cifar100, gtsrb, tiny, mnist")
    add("--dataset_path", type=str, help="folder holding <dataset>/ (default data)")
    add("--download", type=str2bool, help="download the clean dataset if it is missing (cifar10/100, mnist)")
    add("--record_dir", type=str, help="folder of attack records (default record)")
    add("--trust_record", type=str2bool,
        help="load records that need unrestricted unpickling (v1, in-memory images); can run code from the file")
    add("--model", type=str, help="model name; must match the record's model_name")
    add("--device", type=str, help="cpu, cuda, cuda:N (default: cuda when available)")
    add("--ratio", type=float, help="share of the clean training split used by the defense")
    add("--index", type=none_or_str, help="file of clean-subset indices (one per line) instead of sampling")
    add("--random_seed", type=int, help="seed of python, numpy and torch")
    add("--batch_size", type=int, help="training batch size")
    add("--amp", type=amp_option, metavar="{auto,true,false}",
        help="autocast: auto (float16 on CUDA, bfloat16 only on CPUs that run it natively), true or false")
    add("--eval_every", type=int, help="also evaluate the test sets every N epochs (0: only at phase ends)")
    add("--eval_batch_size", type=int, help="batch size of evaluation")
    add("--eval_limit", type=int,
        help="evaluate on only the first N images of each test set (quick checks; 0: the full sets)")
    add("--num_workers", type=int, help="accepted for BackdoorBench compatibility; data lives on the device")
    add("--progress", type=str2bool, help="show progress bars")
    return parser


DEFENSE_CONFIGS = REPO_ROOT / "config" / "defense"


def defense_defaults(parser, defense=None):
    """Every default of `defense`, from YAML only: config/defense/common.yaml (the frame's options), then
    config/defense/<defense>/config.yaml (none: the frame's alone); each value converted with its option's type."""
    paths = [DEFENSE_CONFIGS / "common.yaml"] + ([DEFENSE_CONFIGS / defense / "config.yaml"] if defense else [])
    return read_defaults(parser, paths)


def parse_defense_args(parser, argv, defense=None):
    """The options of a run of `defense`: command line > --yaml_path > its config.yaml > common.yaml."""
    defaults = defense_defaults(parser, defense)
    show_defaults(parser, defaults)
    args = parse_config(parser, argv, defaults)
    if not args.result_file:
        raise UserError("--result_file is required (the record folder name under record/)")
    if not 0 < args.ratio <= 1:
        raise UserError(f"--ratio must be in (0, 1], got {args.ratio}")
    for name in ("batch_size", "eval_batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be a positive integer")
    if args.eval_limit < 0:
        raise UserError("--eval_limit must be >= 0 (0: the full test sets)")
    return args


def clean_subset_indices(num_train, ratio, index_file=None):
    """BackdoorBench's clean subset: random.sample(range(N), int(N * ratio)) from the seeded python random,
    or the indices in `index_file`."""
    if index_file:
        indices = read_index(index_file)
        bad = [i for i in indices if not 0 <= i < num_train]
        if bad or not indices:
            raise UserError(f"index file {index_file}: indices must be in [0, {num_train}); found {bad[:3] or 'none'}")
        return indices
    count = int(num_train * ratio)
    if count < 1:
        raise UserError(f"--ratio {ratio} of {num_train} training samples selects no sample")
    return random.sample(range(num_train), count)


@dataclass
class DefenseSetup:
    args: argparse.Namespace
    record: object
    device: torch.device
    model: torch.nn.Module  # the backdoored model, on the device
    original_state: dict  # the backdoored weights (CPU copy)
    clean_indices: list
    clean_subset: DeviceImages
    augmentation: Augmentation
    eval_sets: EvalSets
    precision: str = ""  # the precision policy's choice and reason, one log line
    seconds: dict = field(default_factory=dict)

    def fresh_backdoored_model(self):
        """A new model with the original backdoored weights, on the device."""
        model = build_model(self.record.model_name, self.record.num_classes, self.record.img_size)
        return prepare_model(load_weights(model, self.original_state), self.device)


def check_against_clean_split(split, clean, record_name):
    """The poisoned split's indices inside the clean split and its original labels equal to the clean labels
    (v1 records that do not store them take the clean ones). Returns the original labels."""
    outside = split.original_indices >= len(clean)
    if outside.any():
        raise UserError(f"record {record_name}: {split.name} index {int(split.original_indices[outside][0])} is "
                        f"outside the {len(clean)} samples of the clean split")
    clean_labels = np.asarray(clean.labels)[split.original_indices]
    given = split.original_labels >= 0
    differ = given & (split.original_labels != clean_labels)
    if differ.any():
        at = int(np.flatnonzero(differ)[0])
        raise UserError(f"record {record_name}: {split.name} sample {int(split.original_indices[at])} has original "
                        f"label {int(split.original_labels[at])}, but the clean data labels it "
                        f"{int(clean_labels[at])} (a record of another dataset, or a damaged one)")
    return np.where(given, split.original_labels, clean_labels)


def prepare_defense(args):
    """Seed, load the record, check it against --dataset/--model, build the model, draw the clean subset and
    put it and the test sets on the device."""
    start = time.perf_counter()
    seed_everything(args.random_seed)
    device = pick_device(args.device)
    args.amp, precision = resolve_amp(args.amp, device)
    record = load_attack_record(args.result_file, args.record_dir, trust=args.trust_record)
    dataset = args.dataset or record.clean_data
    if dataset != record.clean_data:
        raise UserError(f"record {record.name} was made on {record.clean_data}, but --dataset is {dataset}")
    info = dataset_info(dataset)
    if record.num_classes != info.num_classes:
        raise UserError(f"record {record.name} has num_classes {record.num_classes}, but {dataset} has "
                        f"{info.num_classes} classes")
    if tuple(record.img_size) != tuple(info.img_size):
        raise UserError(f"record {record.name} has img_size {record.img_size}, but {dataset} images are "
                        f"{info.img_size}")
    if args.model and args.model != record.model_name:
        raise UserError(f"--model {args.model} does not match the record's model {record.model_name}; "
                        f"pass --model {record.model_name} (or leave it out)")
    args.dataset, args.model = dataset, record.model_name
    model = build_model(record.model_name, record.num_classes, record.img_size)
    load_weights(model, record.state_dict, f"record {record.name}")
    original_state = {key: value.clone() for key, value in model.state_dict().items()}
    model = prepare_model(model, device)

    train = CleanSplit(dataset, args.dataset_path, train=True, download=args.download)
    indices = clean_subset_indices(len(train), args.ratio, args.index)
    clean_subset = DeviceImages(train.images(indices), train.labels[indices], device, info.mean, info.std)

    test = CleanSplit(dataset, args.dataset_path, train=False)
    bd = record.bd_test
    original = check_against_clean_split(bd, test, record.name)
    bd_images = bd.images(info.img_size)
    if bd_images.shape[1:] != tuple(info.img_size):
        raise UserError(f"poisoned test images are {bd_images.shape[1:]}, expected {info.img_size} for {dataset}")
    limit = slice(args.eval_limit or None)
    clean_indices = np.arange(len(test))[limit]
    eval_sets = EvalSets(
        clean_test=DeviceImages(test.images(clean_indices), test.labels[limit], device, info.mean, info.std),
        bd_test=DeviceImages(bd_images[limit], bd.bd_labels[limit], device, info.mean, info.std,
                             original=original[limit]),
    )
    setup = DefenseSetup(args, record, device, model, original_state, list(indices), clean_subset,
                         Augmentation(crop_padding=4, flip=info.random_flip), eval_sets, precision)
    setup.seconds["load"] = time.perf_counter() - start
    return setup
