"""BadNets (Gu et al. 2017): a small patch stamped on poisoned images, relabelled to the target.

    python attack/badnet.py --yaml_path config/attack/prototype/cifar10.yaml \
        --bd_yaml_path config/attack/badnet/default.yaml --save_folder_name badnet_0_1
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python attack/badnet.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image

from utils.attack_run import attack_parser, parse_attack_args, run_attack
from utils.errors import UserError, run_cli
from utils.triggers import TRIGGERS


def main(argv=None):
    parser = attack_parser(__doc__.splitlines()[0])
    parser.add_argument("--patch_mask_path", type=str,
                        help="trigger image (pixels that are non-zero replace the image's); default: 3x3 white patch")
    args = parse_attack_args(parser, argv, "badnet")
    trigger_image = None
    if args.patch_mask_path:
        try:
            trigger_image = np.asarray(Image.open(args.patch_mask_path).convert("RGB"), dtype=np.uint8)
        except OSError as err:
            raise UserError(f"cannot read --patch_mask_path {args.patch_mask_path}: {err}") from None
    badnet = TRIGGERS["badnet"]
    return run_attack(args, lambda images: badnet.apply(images, trigger_image=trigger_image), attack_name="badnet")


if __name__ == "__main__":
    sys.exit(run_cli(main))
