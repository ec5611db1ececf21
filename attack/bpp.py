"""BppAttack (Wang et al., CVPR 2022): colour depth squeezed to a few levels per channel (optionally with
Floyd-Steinberg dithering); poisons batches while the model trains, with negative samples that carry another image's
squeezing residual at their true labels.

    python attack/bpp.py --yaml_path config/attack/prototype/cifar10.yaml \
        --bd_yaml_path config/attack/bpp/default.yaml --save_folder_name bpp_0_1

In every shuffled batch pratio * batch samples are squeezed and relabelled, neg_ratio * batch samples get
squeeze(r) - r of a random training image r added (clipped to [0, 255]) and keep their labels, as BackdoorBench's
bpp.py builds them; the rest stay clean. cross_test_dataset/ holds every test image made negative the same way.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python attack/bpp.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from utils.attack_run import DynamicAttack, attack_parser, parse_attack_args, run_attack
from utils.config import str2bool
from utils.errors import UserError, run_cli
from utils.triggers import TRIGGERS, map_in_chunks, squeeze_colours


class Bpp(DynamicAttack):
    name = "bpp"

    def squeeze(self, pixels):
        return squeeze_colours(pixels, self.args.squeeze_num, self.args.dithering)

    def negative(self, pixels, partners, squeezed_partners):
        """Pixels plus the squeezing residual of other images: a trigger-like change that must not flip the label."""
        return (pixels + squeezed_partners - partners).clamp(0, 255)

    def kept_count(self, poisoned, batch_size):
        return int(batch_size * self.args.neg_ratio)

    def trigger_batch(self, x, data):
        return data.from_pixels(self.squeeze(data.pixels(x).round()))

    def train(self, model, train_images, train_labels, args, device, logger):
        # the whole training set squeezed once, as BackdoorBench does: negatives borrow the residual of any of it
        self.squeezed_train = torch.from_numpy(self.apply(train_images)).to(device)
        return super().train(model, train_images, train_labels, args, device, logger)

    def perturb_batch(self, x, data):
        if len(x) == 0:
            return x
        chosen = torch.randint(len(data), (len(x),), generator=self.batch_generator).to(data.device)
        partners, squeezed = (images[chosen].permute(0, 3, 1, 2).float()
                              for images in (data.images, self.squeezed_train))
        return data.from_pixels(self.negative(data.pixels(x).round(), partners, squeezed))

    def apply(self, images):
        return TRIGGERS["bpp"].apply(images, squeeze_num=self.args.squeeze_num, dithering=self.args.dithering)

    def cross(self, images):
        if not self.args.neg_ratio:
            return None
        rng = np.random.default_rng(self.args.random_seed + 2)  # the same cross images every run
        partners = images[rng.integers(0, len(images), len(images))]
        return map_in_chunks(self.negative, images, partners, self.apply(partners))


def main(argv=None):
    parser = attack_parser(__doc__.splitlines()[0])
    add = parser.add_argument
    add("--squeeze_num", type=int, help="colour levels per channel (BackdoorBench: 8)")
    add("--dithering", type=str2bool, help="Floyd-Steinberg error diffusion while squeezing (BackdoorBench: False)")
    add("--neg_ratio", type=float, help="share of each batch made negative samples (BackdoorBench: 0.1)")
    args = parse_attack_args(parser, argv, "bpp")
    if not 2 <= args.squeeze_num <= 256:
        raise UserError(f"--squeeze_num must be in [2, 256], got {args.squeeze_num}")
    if not 0 <= args.neg_ratio <= 1 or args.pratio + args.neg_ratio > 1:
        raise UserError(f"--neg_ratio must be in [0, 1] and pratio + neg_ratio at most 1 (got {args.neg_ratio})")
    return run_attack(args, dynamic=Bpp(args))


if __name__ == "__main__":
    sys.exit(run_cli(main))
