"""SIG (Barni et al. 2019): clean-label; a horizontal sinusoid added to target-class training images.

    python attack/sig.py --yaml_path config/attack/prototype/cifar10.yaml \
        --bd_yaml_path config/attack/sig/default.yaml --save_folder_name sig_0_1
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python attack/sig.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.attack_run import attack_parser, parse_attack_args, run_attack
from utils.errors import run_cli
from utils.triggers import TRIGGERS


def main(argv=None):
    parser = attack_parser(__doc__.splitlines()[0])
    parser.add_argument("--sig_delta", type=float, help="amplitude (BackdoorBench: 40)")
    parser.add_argument("--sig_f", type=float, help="frequency (BackdoorBench: 6)")
    args = parse_attack_args(parser, argv, "sig")
    sig = TRIGGERS["sig"]
    return run_attack(args, lambda images: sig.apply(images, delta=args.sig_delta, frequency=args.sig_f),
                      clean_label=True, attack_name="sig")


if __name__ == "__main__":
    sys.exit(run_cli(main))
