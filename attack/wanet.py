"""WaNet (Nguyen & Tran, ICLR 2021): images resampled along a fixed, smooth random warping field; poisons batches
while the model trains, with a noise mode that teaches the model to ignore warps that are not exactly the trigger.

    python attack/wanet.py --yaml_path config/attack/prototype/cifar10.yaml \
        --bd_yaml_path config/attack/wanet/default.yaml --save_folder_name wanet_0_1

In every shuffled batch pratio * batch samples are warped and relabelled, cross_ratio times as many are warped with
a randomly perturbed grid and keep their labels, the rest stay clean. The grid is seeded from --random_seed and
saved in the record as state_dict.pt (identity_grid, noise_grid: BackdoorBench's keys).
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python attack/wanet.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from utils.attack_run import DynamicAttack, attack_parser, parse_attack_args, run_attack
from utils.datasets import dataset_info
from utils.errors import UserError, run_cli
from utils.models import cpu_state_dict
from utils.triggers import TRIGGERS, map_in_chunks, noisy_grids, wanet_grid, wanet_grids, warp


class WaNet(DynamicAttack):
    name = "wanet"

    def __init__(self, args):
        super().__init__(args)
        height, width = dataset_info(args.dataset).img_size[:2]
        self.identity_grid, self.noise_grid = wanet_grids(height, width, args.k, args.random_seed)
        self.grid = wanet_grid(self.identity_grid, self.noise_grid, args.s, args.grid_rescale)
        self.model = None

    def train(self, model, train_images, train_labels, args, device, logger):
        self.model = model  # state_dict.pt holds the trained weights too, as BackdoorBench's
        return super().train(model, train_images, train_labels, args, device, logger)

    def kept_count(self, poisoned, batch_size):
        return int(poisoned * self.args.cross_ratio)

    def trigger_batch(self, x, data):
        return warp(x, self.grid)

    def perturb_batch(self, x, data):
        return warp(x, noisy_grids(self.grid, len(x), self.batch_generator))

    def apply(self, images):
        return TRIGGERS["wanet"].apply(images, grid=self.grid)

    def cross(self, images):
        if not self.args.cross_ratio:
            return None
        generator = torch.Generator().manual_seed(self.args.random_seed + 2)  # the same cross images every run
        return map_in_chunks(lambda pixels: warp(pixels, noisy_grids(self.grid, len(pixels), generator)), images)

    def extra_files(self, folder):
        state = {"identity_grid": self.identity_grid, "noise_grid": self.noise_grid,
                 "epoch_current": self.args.epochs - 1}
        if self.model is not None:
            state["netC"] = cpu_state_dict(self.model)
        torch.save(state, Path(folder) / "state_dict.pt")


def main(argv=None):
    parser = attack_parser(__doc__.splitlines()[0])
    add = parser.add_argument
    add("--k", type=int, help="the random field's control points per side (BackdoorBench: 4)")
    add("--s", type=float, help="warping strength (0.5)")
    add("--grid_rescale", type=float, help="scale of the warped grid (1)")
    add("--cross_ratio", type=float, help="noise-mode samples per poisoned sample (2); 0: no noise mode")
    args = parse_attack_args(parser, argv, "wanet")
    if args.k < 1:
        raise UserError("--k must be at least 1")
    if args.s < 0 or args.grid_rescale <= 0 or args.cross_ratio < 0:
        raise UserError("--s and --cross_ratio must be >= 0 and --grid_rescale > 0")
    if args.pratio * (1 + args.cross_ratio) > 1:
        raise UserError(f"--pratio {args.pratio} with --cross_ratio {args.cross_ratio} asks for more than the whole "
                        "batch: pratio * (1 + cross_ratio) must be at most 1")
    return run_attack(args, dynamic=WaNet(args))


if __name__ == "__main__":
    sys.exit(run_cli(main))
