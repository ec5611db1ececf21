"""RNP: Reconstructive Neuron Pruning.

Li, Lyu, Ma, Koren, Lyu, Li, Jiang. "Reconstructive Neuron Pruning for Backdoor Defense", ICML 2023.
Unlearn the clean subset by gradient ascent until the clean accuracy collapses, then, on the unlearned model, learn
a mask on every BatchNorm channel that recovers the clean accuracy (only the masks learn); the channels the recovery
keeps switched off are the backdoor's: prune them (zero their BatchNorm scale) in the original backdoored model.

    python defense/rnp.py --result_file badnet_0_1 --yaml_path config/defense/rnp/cifar10.yaml --dataset cifar10
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python defense/rnp.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from utils.config import require_above, require_at_least, require_in
from utils.defense_run import run_defense
from utils.defense_setup import defense_parser
from utils.errors import run_cli
from utils.pruning import (BatchNormMasks, add_pruning_options, batchnorm_layers,
                           check_pruning_args, prune_by_masks, split_for_rule)
from utils.precision import grad_scaler
from utils.training import train_epoch
from utils.unlearning import UnlearningRule, unlearn as unlearn_until_forgotten

DEFENSE = "rnp"



def build_parser():
    parser = defense_parser("RNP: unlearn, learn BatchNorm-channel masks that recover clean accuracy, prune the "
                            "channels they switch off in the original model.")
    add = parser.add_argument
    add("--unlearning_epochs", type=int, help="at most this many epochs of gradient ascent")
    add("--unlearning_lr", type=float, help="unlearning SGD learning rate")
    add("--schedule", type=int, nargs="+", help="unlearning MultiStepLR milestones (epochs)")
    add("--steplr_gamma", type=float, help="unlearning MultiStepLR factor")
    add("--sgd_momentum", type=float, help="momentum of the unlearning and the mask SGD")
    add("--wd", type=float, help="unlearning weight decay")
    add("--clean_threshold", type=float, help="stop unlearning after the epoch whose training accuracy is <= this")
    add("--unlearning_grad_clip", type=float,
        help="clip the total gradient norm while unlearning (0: off; the reference calls its clip of 20 before "
             "backward, where it clips nothing)")
    add("--recovering_epochs", type=int, help="epochs of mask learning on the unlearned model")
    add("--recovering_lr", type=float, help="mask learning rate")
    add("--alpha", type=float, help="weight of the cross-entropy while recovering (the reference's 0.2)")
    add_pruning_options(parser)
    return parser


def check_args(args):
    require_at_least(args, 0, "unlearning_epochs", "recovering_epochs")
    require_above(args, 0, "unlearning_lr", "recovering_lr", "alpha")
    require_in(args, "clean_threshold", "[0, 1]", why="an accuracy")
    check_pruning_args(args)


def unlearn(run, model, data):
    """Gradient ascent on the clean data until an epoch's running training accuracy is <= clean_threshold."""
    args = run.args
    optimizer = torch.optim.SGD(model.parameters(), lr=args.unlearning_lr, momentum=args.sgd_momentum,
                                weight_decay=args.wd)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(args.schedule), gamma=args.steplr_gamma)
    rule = UnlearningRule(optimizer, args.clean_threshold, args.unlearning_epochs, scheduler=scheduler,
                          grad_clip=args.unlearning_grad_clip or None)
    return unlearn_until_forgotten(run, model, data, rule)[0]


def recover(run, model, masks, data):
    """Learn only the channel masks of the unlearned model to recover the clean data (alpha * CE), clipped to
    [0, 1] after each step."""
    args = run.args
    model.requires_grad_(False)  # the weights stay as unlearning left them; no weight gradients are computed
    optimizer = torch.optim.SGD(masks.parameters(), lr=args.recovering_lr, momentum=args.sgd_momentum)
    scaler = grad_scaler(run.device, args.amp)

    def weighted_cross_entropy(logits, labels, _model):
        loss = args.alpha * F.cross_entropy(logits, labels)
        return loss, loss

    rows = []
    for epoch in range(args.recovering_epochs):
        stats = train_epoch(model, data, optimizer, batch_size=args.batch_size, augment=run.setup.augmentation,
                            generator=run.generator, amp=args.amp, scaler=scaler, objective=weighted_cross_entropy,
                            after_step=lambda x, y: masks.clip_())
        run.end_epoch(rows, "recover", epoch, stats, model, f"recovering epoch {epoch}: loss {stats.loss:.4f}, "
                      f"train acc {stats.acc:.4f} ({stats.seconds:.1f} s)")
    return rows


def defend(run):
    setup = run.setup
    model = setup.model  # unlearned and masked in place; the pruned model is a fresh copy of the original
    batchnorm_layers(model, "RNP")  # a model without BatchNorm fails here, before any work
    data, holdout = split_for_rule(setup.clean_subset, run.args, run.generator)
    with run.phase("unlearn"):
        run.add_epoch_table("unlearn_df", unlearn(run, model, data))
    run.summary.update(unlearning_epochs_run=len(run.epoch_tables["unlearn_df"]), mask_samples=len(data))

    with run.phase("recover"), BatchNormMasks(model, "RNP") as masks:
        run.add_epoch_table("recover_df", recover(run, model, masks, data))
        values = masks.values()

    return prune_by_masks(run, values, holdout)


def main(argv=None):
    return run_defense(build_parser(), argv, DEFENSE, defend, check_args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
