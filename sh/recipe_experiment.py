"""Benchmark a training recipe on real CIFAR-10 with a simulated BadNets attack: clean ACC, ASR and wall time.

    python sh/recipe_experiment.py --yaml_path config/attack/prototype/cifar10_cpu.yaml            # BadNets 10%
    python sh/recipe_experiment.py --yaml_path config/attack/prototype/cifar10_cpu.yaml --poison none
    python sh/recipe_experiment.py --yaml_path config/attack/prototype/cifar10_cpu.yaml --epochs 8 --lr 0.3

BadNets as BackdoorBench simulates it: round(pratio * 50000) training indices drawn uniformly among all training
samples (numpy seed `random_seed`), their bottom-right 3x3 pixels set to 255 and their label to 0; the poisoned
test set is every test image whose label is not 0 with the same patch; ASR = share of it predicted 0, clean ACC on
the full test set. An experiment, not a test: it trains a full model (minutes).
"""
import time

STARTED = time.perf_counter()  # before the imports: the total is the whole run's wall time

import argparse  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

if __package__ in (None, ""):  # run as `python sh/recipe_experiment.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from utils.config import parse_config, str2bool  # noqa: E402
from utils.datasets import CleanSplit, dataset_info  # noqa: E402
from utils.attack_run import train_set_with_poison  # noqa: E402
from utils.errors import run_cli  # noqa: E402
from utils.poisoning import backdoor_labels, bd_test_indices, poison, train_poison_indices  # noqa: E402
from utils.models import MODELS, AirbenchCPU, build_model  # noqa: E402
from utils.precision import amp_option, resolve_amp  # noqa: E402
from utils.runtime import pick_device, seed_everything  # noqa: E402
from utils.tensor_data import Augmentation, DeviceImages  # noqa: E402
from utils.triggers import TRIGGERS  # noqa: E402
from utils.training import (EvalSets, TrainingRecipe, accuracy, evaluate, prepare_model,  # noqa: E402
                            train_classifier)

DEFAULTS = {"dataset": "cifar10", "dataset_path": "data", "model": "airbench_cpu", "random_seed": 0, "pratio": 0.1,
            "attack_target": 0, "poison": "badnet", "device": None, "eval_batch_size": 500, "threads": None, "crop_padding": 4,
            "amp": "auto", "progress": False}


def subset(data, count):
    """The first `count` samples of a DeviceImages (a view, for a cheap probe during training)."""
    part = DeviceImages.__new__(DeviceImages)
    part.__dict__.update(data.__dict__, images=data.images[:count], labels=data.labels[:count],
                         extra={key: value[:count] for key, value in data.extra.items()})
    return part


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--yaml_path", type=str, help="the recipe, e.g. config/attack/prototype/cifar10_cpu.yaml")
    add("--poison", type=str, choices=["badnet", "none"], help="badnet (default) or clean training")
    add("--dataset_path", type=str)
    add("--model", type=str, choices=sorted(MODELS))
    add("--epochs", type=int)
    add("--batch_size", type=int)
    add("--lr", type=float)
    add("--lr_scheduler", type=str)
    add("--warmup_epochs", type=float)
    add("--sgd_momentum", type=float)
    add("--nesterov", type=str2bool)
    add("--wd", type=float)
    add("--label_smoothing", type=float)
    add("--amp", type=amp_option)
    add("--random_seed", type=int)
    add("--pratio", type=float)
    add("--device", type=str)
    add("--threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
    add("--progress", type=str2bool)
    add("--widths", type=int, nargs=4, help="airbench_cpu with these widths (stem, group 1, 2, 3) instead of --model")
    add("--crop_padding", type=int, help="random-crop padding of the training augmentation (BackdoorBench: 4)")
    add("--probe_every", type=int, help="every N epochs, ACC and ASR on the first 1000 images of each test set")
    return parse_config(parser, argv, DEFAULTS)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.random_seed)
    device = pick_device(args.device)
    args.amp, precision = resolve_amp(args.amp, device)
    print(precision)
    recipe = TrainingRecipe.from_options(args)
    info = dataset_info(args.dataset)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, device {device}")
    print(f"model {args.model}; recipe: {recipe}")

    train, test = CleanSplit(args.dataset, args.dataset_path, train=True), CleanSplit(args.dataset, args.dataset_path,
                                                                                     train=False)
    train_images, train_labels = train.images(), train.labels.copy()
    test_images, test_labels = test.images(), test.labels
    bd_test = None
    if args.poison == "badnet":
        # exactly what attack/badnet.py poisons (same selection rule and seeded generator)
        apply_badnet = TRIGGERS["badnet"].apply
        chosen = train_poison_indices(train_labels, args.pratio, args.attack_target, False,
                                      np.random.default_rng(args.random_seed))
        bd_train = poison(train_images, train_labels, chosen, apply_badnet,
                          backdoor_labels(train_labels, "all2one", args.attack_target, info.num_classes), len(train))
        train_images, train_labels = train_set_with_poison(train_images, train_labels, bd_train)
        keep = bd_test_indices(test_labels, "all2one", args.attack_target)
        bd_test = DeviceImages(apply_badnet(test_images[keep]), np.full(len(keep), args.attack_target), device,
                               info.mean, info.std, original=test_labels[keep])
        print(f"poisoned {len(chosen)} training samples; {len(keep)} poisoned test samples")

    torch.manual_seed(args.random_seed)
    if args.widths:
        args.model = f"airbench_cpu (widths {args.widths})"
        model = prepare_model(AirbenchCPU(info.num_classes, tuple(args.widths)), device)
    else:
        model = prepare_model(build_model(args.model, info.num_classes, info.img_size), device)
    print(f"{sum(p.numel() for p in model.parameters())} parameters")
    train_data = DeviceImages(train_images, train_labels, device, info.mean, info.std)
    generator = torch.Generator().manual_seed(args.random_seed)
    augment = Augmentation(crop_padding=args.crop_padding, flip=info.random_flip)

    class Log:
        @staticmethod
        def info(line):
            print(f"[{time.perf_counter() - STARTED:6.1f} s] {line}", flush=True)

    clean_test = DeviceImages(test_images, test_labels, device, info.mean, info.std)

    def probe(epoch, row):
        if args.probe_every and (epoch + 1) % args.probe_every == 0:
            row["probe_acc"] = accuracy(model, subset(clean_test, 1000), args.eval_batch_size)
            if bd_test is not None:
                row["probe_asr"] = accuracy(model, subset(bd_test, 1000), args.eval_batch_size)
            model.train()

    tick = time.perf_counter()
    train_classifier(model, train_data, recipe, augment, generator, Log, after_epoch=probe)
    train_seconds = time.perf_counter() - tick

    tick = time.perf_counter()
    if bd_test is not None:
        metrics = evaluate(model, EvalSets(clean_test, bd_test), args.eval_batch_size)
    else:
        metrics = {"test_acc": accuracy(model, clean_test, args.eval_batch_size)}
    eval_seconds = time.perf_counter() - tick
    total = time.perf_counter() - STARTED
    print(f"clean ACC {metrics['test_acc']:.4f}" + (f", ASR {metrics['test_asr']:.4f}, RA {metrics['test_ra']:.4f}"
                                                    if bd_test is not None else ""))
    print(f"training {train_seconds:.1f} s ({train_seconds / 60:.2f} min), evaluation {eval_seconds:.1f} s, "
          f"total {total:.1f} s ({total / 60:.2f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
