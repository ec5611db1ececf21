"""What every defense script does before its own algorithm: options, record, data, model, clean subset."""
import argparse
import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from utils.config import REPO_ROOT, none_or_str, parse_config, read_defaults, show_defaults, str2bool
from utils.datasets import IMAGE_FOLDER, CleanSplit, dataset_info, image_folder_info
from utils.errors import UserError
from utils.models import build_model, cpu_state_dict, load_weights
from utils.precision import amp_option, resolve_amp
from utils.records import load_attack_record
from utils.reporting import read_index
from utils.runtime import pick_device, seed_everything
from utils.tensor_data import Augmentation, DeviceImages
from utils.training import EvalSets, prepare_model
from utils.user_models import build_user_model, check_outputs, convert_probabilities_to_log, is_user_model, same_model


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
    log_of_probabilities: bool = False  # the model outputs probabilities; a hook turns them into log-probabilities
    notes: list = field(default_factory=list)  # one log line each: how the model is run (own model, outputs)

    def fresh_backdoored_model(self):
        """A new model with the original backdoored weights, on the device."""
        return record_model(self.record, self.original_state, self.device, self.log_of_probabilities)


def record_model(record, state_dict, device, log_of_probabilities=False):
    """The record's model with `state_dict`, on `device`. A registered model runs channels_last (utils.training);
    the user's own model keeps the default memory format, since one that calls x.view fails on channels_last."""
    if is_user_model(record.model_name):
        model = build_user_model(record.model_name, record.num_classes, record.img_size)
        model = load_weights(model, state_dict, f"record {record.name}").to(device)
    else:
        model = build_model(record.model_name, record.num_classes, record.img_size)
        model = prepare_model(load_weights(model, state_dict, f"record {record.name}"), device)
    if log_of_probabilities:
        convert_probabilities_to_log(model)
    return model


def record_normalization(record, default=None):
    """(mean, std) the model expects: the record's own `normalization` (records made from a user's model), else
    `default` (the dataset's)."""
    given = record.extra.get("normalization")
    if given is None:
        if default is None:
            raise UserError(f"record {record.name}: a record of the user's own data needs its normalization field")
        return default
    channels = record.img_size[2] if len(record.img_size) > 2 else 3
    try:
        mean, std = [float(v) for v in given["mean"]], [float(v) for v in given["std"]]
    except (KeyError, TypeError, ValueError):
        raise UserError(f"record {record.name}: field normalization must be {{'mean': [...], 'std': [...]}}") from None
    if len(mean) != channels or len(std) != channels or not np.all(np.isfinite(mean + std)) or min(std) <= 0:
        raise UserError(f"record {record.name}: normalization needs {channels} finite means and positive stds, got "
                        f"mean {mean}, std {std}")
    return tuple(mean), tuple(std)


def record_dataset(record, args):
    """(dataset name, DatasetInfo, folder to read it from) of the record's clean data: a registered dataset (under
    --dataset_path) or the user's image folder (the record's data_path), checked against --dataset."""
    dataset = args.dataset or record.clean_data
    if dataset != record.clean_data:
        raise UserError(f"record {record.name} was made on {record.clean_data}, but --dataset is {dataset}")
    if dataset != IMAGE_FOLDER:
        info = dataset_info(dataset)
        mean, std = record_normalization(record, (info.mean, info.std))
        return dataset, dataclasses.replace(info, mean=mean, std=std), args.dataset_path
    names = record.extra.get("class_names")
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names) or len(set(names)) != len(names):
        raise UserError(f"record {record.name}: an image-folder record needs class_names, a list of distinct texts")
    if len(names) != record.num_classes:
        raise UserError(f"record {record.name}: {len(names)} class_names for num_classes {record.num_classes}")
    mean, std = record_normalization(record)
    if not Path(record.data_path).is_dir():
        raise UserError(f"record {record.name} reads its clean images from the folder {record.data_path}, which is "
                        "not there; make the record again with sh/make_record.py where the images are")
    return dataset, image_folder_info(record.img_size, mean, std, names), record.data_path


def checked_model_notes(record, model, own_model):
    """One forward pass of a probe batch before anything else runs, for the user's own model or a registered one on
    an image folder (any image size): it must take the record's image size and output (N, num_classes) finite scores;
    an own model's rows that are probabilities are run through a log. Returns (log of probabilities?, log lines)."""
    probabilities = check_outputs(model, record.num_classes, record.img_size, f"the model of record {record.name}")
    if not own_model:
        return False, []
    notes = [f"own model {record.model_name}: default memory format (channels_last only for registered models)"]
    if probabilities:
        notes.append("the model outputs probabilities (rows sum to 1): the defenses train and score on their "
                     "logarithm (argmax unchanged; cross-entropy as on logits)")
    return probabilities, notes


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


def prepare_defense(args, check_model=None):
    """Seed, load the record, check it against --dataset/--model, build the model (and check it with
    `check_model(model, record, args)`, before any data is read), draw the clean subset and put it and the test
    sets on the device."""
    start = time.perf_counter()
    seed_everything(args.random_seed)
    device = pick_device(args.device)
    args.amp, precision = resolve_amp(args.amp, device)
    record = load_attack_record(args.result_file, args.record_dir, trust=args.trust_record)
    dataset, info, dataset_path = record_dataset(record, args)
    if record.num_classes != info.num_classes:
        raise UserError(f"record {record.name} has num_classes {record.num_classes}, but {dataset} has "
                        f"{info.num_classes} classes")
    if tuple(record.img_size) != tuple(info.img_size):
        raise UserError(f"record {record.name} has img_size {record.img_size}, but {dataset} images are "
                        f"{info.img_size}")
    own_model = is_user_model(record.model_name)
    if own_model and not args.model:
        # importing it runs the user's code: only when the user names it, never because a record says so
        raise UserError(f"record {record.name} holds a model built by {record.model_name}, which runs code; to run "
                        f"it, pass --model {record.model_name}")
    if args.model and not same_model(args.model, record.model_name):
        raise UserError(f"--model {args.model} does not match the record's model {record.model_name}; "
                        f"pass --model {record.model_name}" + ("" if own_model else " (or leave it out)"))
    args.dataset, args.model = dataset, record.model_name
    model = record_model(record, record.state_dict, device)
    original_state = cpu_state_dict(model)
    probabilities, notes = False, []
    if own_model or dataset == IMAGE_FOLDER:
        probabilities, notes = checked_model_notes(record, model, own_model)
    if probabilities:
        convert_probabilities_to_log(model)
    if check_model is not None:
        check_model(model, record, args)

    read = {"info": info} if dataset == IMAGE_FOLDER else {"download": args.download}
    train = CleanSplit(dataset, dataset_path, train=True, **read)
    indices = clean_subset_indices(len(train), args.ratio, args.index)
    clean_subset = DeviceImages(train.images(indices), train.labels[indices], device, info.mean, info.std)

    test = CleanSplit(dataset, dataset_path, train=False, **({"info": info} if dataset == IMAGE_FOLDER else {}))
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
                         Augmentation(crop_padding=4, flip=info.random_flip), eval_sets, precision,
                         log_of_probabilities=probabilities, notes=notes)
    setup.seconds["load"] = time.perf_counter() - start
    return setup
