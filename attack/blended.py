"""Blended (Chen et al. 2017): a full-image pattern mixed into poisoned images with weight alpha.

    python attack/blended.py --yaml_path config/attack/prototype/cifar10.yaml \
        --bd_yaml_path config/attack/blended/default.yaml --save_folder_name blended_0_1
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python attack/blended.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.attack_run import attack_parser, parse_attack_args, run_attack
from utils.errors import UserError, run_cli
from utils.triggers import TRIGGERS


def main(argv=None):
    parser = attack_parser(__doc__.splitlines()[0])
    parser.add_argument("--attack_train_blended_alpha", type=float, help="blend weight (BackdoorBench: 0.2)")
    parser.add_argument("--attack_test_blended_alpha", type=float, help="blend weight on bd_test (0.2)")
    args = parse_attack_args(parser, argv, "blended")
    if args.attack_train_blended_alpha != args.attack_test_blended_alpha:
        raise UserError("different train and test blend weights are not supported yet")
    blended = TRIGGERS["blended"]
    return run_attack(args, lambda images: blended.apply(images, alpha=args.attack_train_blended_alpha),
                      attack_name="blended")


if __name__ == "__main__":
    sys.exit(run_cli(main))
