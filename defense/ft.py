"""FT: fine-tuning baseline (BackdoorBench's `ft`).

Fine-tune the whole backdoored model on the clean subset (5% of the training split) with SGD and a cosine schedule.
The reference point every other defense should beat: it costs only clean data and training time.

    python defense/ft.py --result_file badnet_0_1 --yaml_path config/defense/ft/cifar10.yaml --dataset cifar10
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python defense/ft.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.config import require_at_least
from utils.defense_run import run_defense
from utils.defense_setup import defense_parser
from utils.errors import run_cli
from utils.training import fine_tune

DEFENSE = "ft"



def build_parser():
    parser = defense_parser("FT: fine-tune the backdoored model on the clean subset.")
    add = parser.add_argument
    add("--epochs", type=int, help="fine-tuning epochs")
    add("--lr", type=float, help="SGD learning rate")
    add("--sgd_momentum", type=float, help="SGD momentum")
    add("--wd", type=float, help="weight decay")
    add("--lr_scheduler", type=str, choices=["CosineAnnealingLR", "none"], help="stepped once per epoch")
    return parser


def check_args(args):
    require_at_least(args, 0, "epochs")


def defend(run):
    model = run.setup.model
    with run.phase("finetune"):
        run.add_epoch_table("ft_df", fine_tune(run, model, run.setup.clean_subset, "finetune"))
    return model


def main(argv=None):
    return run_defense(build_parser(), argv, DEFENSE, defend, check_args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
