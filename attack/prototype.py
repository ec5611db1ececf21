"""Clean training (no attack): writes record/<save_folder_name>/clean_model.pth (a bare state_dict).

    python attack/prototype.py --yaml_path config/attack/prototype/cifar10.yaml --save_folder_name clean_0
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python attack/prototype.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.attack_run import attack_parser, parse_attack_args, run_attack
from utils.errors import run_cli


def main(argv=None):
    args = parse_attack_args(attack_parser(__doc__.splitlines()[0]), argv, "prototype")
    return run_attack(args, attack_name="prototype")


if __name__ == "__main__":
    sys.exit(run_cli(main))
