"""FP: Fine-Pruning.

Liu, Dolan-Gavitt, Garg. "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural Networks", RAID 2018.
Backdoor behaviour hides in channels of the last convolutional block that clean inputs leave dormant: record each
channel's mean activation on clean data, prune the channels in increasing order of activation while the clean
accuracy stays close to the unpruned model's, then fine-tune the pruned model on the clean data.

- The channels are those of the feature map entering the global pooling layer (PreAct-ResNet18: layer4's output).
  A channel is pruned by zeroing its column in the first Linear layer that reads the pooled features: the same
  function as zeroing the channel (checked on a clean batch before any work), stored in the saved weights, and kept
  at zero while fine-tuning.
- The amount (a share of the channels, in --pruning_step steps) is chosen on a held-out part of the clean subset
  (utils/pruning.py's rule). BackdoorBench chooses it with the test set's accuracy, an oracle; here that is only the
  labelled analysis --sweep.

    python defense/fp.py --result_file badnet_0_1 --yaml_path config/defense/fp/cifar10.yaml --dataset cifar10
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python defense/fp.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from utils.config import none_or_str, require, require_at_least, require_in, str2bool
from utils.defense_run import run_defense
from utils.defense_setup import defense_parser
from utils.errors import run_cli
from utils.model_graph import find_prunable_channels, mean_channel_activation
from utils.pruning import candidate_amounts, split_for_rule
from utils.selection import LabelledSweep, largest_within_tolerance, sweep_help
from utils.reporting import write_table
from utils.training import accuracy, fine_tune

DEFENSE = "fp"


def build_parser():
    parser = defense_parser("FP: prune the last conv block's channels least active on clean data, then fine-tune.")
    add = parser.add_argument
    add("--pool_name", type=none_or_str,
        help="qualified name of the global pooling layer whose input channels are scored and pruned "
             "(none: the last AdaptiveAvgPool2d/AdaptiveMaxPool2d with a 1x1 output)")
    add("--acc_tolerance", type=float,
        help="keep the largest share before the first one whose accuracy on the held-out part of the clean "
             "subset drops by more than this (absolute) below the unpruned model's")
    add("--holdout_ratio", type=float,
        help="share of the clean subset held out to judge the pruning (activations come from the rest)")
    add("--pruning_step", type=float, help="step of the pruned share of channels (0.01: 1%% more per step)")
    add("--pruning_max", type=float, help="largest share of channels tried")
    add("--sweep", type=str2bool,
        help=sweep_help("write pruning_sweep.csv with test ACC/ASR/RA of the pruned model (before fine-tuning) "
                        "at every share of the grid (BackdoorBench picks its amount this way)"))
    add("--epochs", type=int, help="fine-tuning epochs after pruning")
    add("--lr", type=float, help="fine-tuning SGD learning rate")
    add("--sgd_momentum", type=float, help="fine-tuning SGD momentum")
    add("--wd", type=float, help="fine-tuning weight decay")
    add("--lr_scheduler", type=str, choices=["CosineAnnealingLR", "none"], help="stepped once per epoch")
    return parser


def check_args(args):
    require_at_least(args, 0, "epochs")
    require_at_least(args, 0, "acc_tolerance", why="an absolute accuracy drop")
    require_in(args, "holdout_ratio", "(0, 1)")
    require(0 < args.pruning_step <= args.pruning_max < 1, f"--pruning_step and --pruning_max must satisfy "
            f"0 < step <= max < 1, got {args.pruning_step} and {args.pruning_max}")


def channels_at(share, total):
    """How many channels a pruned share means (rounded down)."""
    return int(share * total + 1e-9)


@torch.no_grad()
def zero_columns(linear, original, channels):
    """The Linear's original weight with the columns of `channels` zeroed."""
    linear.weight.copy_(original)
    linear.weight[:, channels] = 0


def choose_amount(run, model, target, order, holdout):
    """Prune ever more of the least-active channels (nested sets, the shares of the --pruning_step grid) and stop at
    the first share whose held-out accuracy falls outside --acc_tolerance of the unpruned model's; the largest share
    before it is kept. With --sweep the grid goes on to --pruning_max with the TEST sets (analysis only).
    Returns (share, number of channels, the rule's rows); the model comes back unpruned."""
    args, linear = run.args, target.linear
    original = linear.weight.detach().clone()
    rows, judging, baseline = [], True, None
    sweep = LabelledSweep(run, "sweep", "pruning_sweep.csv", "pruned share") if args.sweep else None
    for share in candidate_amounts("share", args.pruning_max, args.pruning_step):
        if not (judging or sweep):
            break  # the rule has stopped and no sweep goes on
        count = channels_at(share, target.channels)
        if rows and count == rows[-1]["pruned_channels"]:
            continue  # this share prunes no further channel
        zero_columns(linear, original, order[:count])
        row = {"share": share, "pruned_channels": count}
        if judging:
            with run.phase("prune"):
                row["holdout_acc"] = accuracy(model, holdout, args.eval_batch_size)
            run.count_images("prune", len(holdout))
            baseline = row["holdout_acc"] if baseline is None else baseline
            judging = largest_within_tolerance([share], [row["holdout_acc"]], baseline, args.acc_tolerance) is not None
        if sweep:
            with run.phase("sweep"):
                sweep.measure(model, row, f"sweep (TEST data, analysis only) share {share}: {count} channels pruned")
        rows.append(row)
    zero_columns(linear, original, [])
    judged = [row for row in rows if "holdout_acc" in row]
    share = largest_within_tolerance([row["share"] for row in judged], [row["holdout_acc"] for row in judged],
                                     baseline, args.acc_tolerance)
    if sweep:
        sweep.write(rows)
    return share, next(row["pruned_channels"] for row in judged if row["share"] == share), judged


def finetune(run, model, linear, pruned):
    """FT's fine-tuning on the whole clean subset; a gradient mask keeps the pruned columns at zero (with zero
    gradient, SGD's momentum and weight decay leave a zero weight at zero)."""
    keep = torch.ones_like(linear.weight)
    keep[:, pruned] = 0
    handle = linear.weight.register_hook(lambda grad: grad * keep)
    try:
        return fine_tune(run, model, run.setup.clean_subset, "finetune")
    finally:
        handle.remove()


def defend(run):
    setup, args = run.setup, run.args
    model = setup.model
    first = next(setup.clean_subset.batches(min(len(setup.clean_subset), 32)))[0]
    target = find_prunable_channels(model, first, args.pool_name)  # a model FP cannot prune fails here
    data, holdout = split_for_rule(setup.clean_subset, args, run.generator)
    with run.phase("activation"):
        activation = mean_channel_activation(model, target.pool, data, args.eval_batch_size)
    run.count_images("activation", len(data))
    order = torch.argsort(activation, stable=True).tolist()  # least active first; ties by channel index

    share, count, judged = choose_amount(run, model, target, order, holdout)
    pruned = sorted(order[:count])
    zero_columns(target.linear, target.linear.weight.detach().clone(), pruned)
    run.logger.info(f"clean-subset rule: held-out accuracy {judged[0]['holdout_acc']:.4f} unpruned; largest share "
                    f"within {args.acc_tolerance} of it: {share} ({count} of {target.channels} channels entering "
                    f"{target.pool_name}, zeroed in {target.linear_name})")
    write_table(rows_of_channels(activation, order, pruned), run.path / "channel_activation.csv")
    write_table(judged, run.path / "pruning_rule.csv")
    run.summary.update(pruning={
        "rule": "acc_tolerance", "acc_tolerance": args.acc_tolerance, "holdout_samples": len(holdout),
        "activation_samples": len(data), "pool": target.pool_name, "linear": target.linear_name,
        "pruning_amount": share, "pruned_channels": count, "total_channels": target.channels,
        "holdout_acc_unpruned": judged[0]["holdout_acc"],
        "holdout_acc_chosen": next(row["holdout_acc"] for row in judged if row["share"] == share),
        "pruned_channel_indices": pruned})

    with run.phase("finetune"):
        run.add_epoch_table("fp_df", finetune(run, model, target.linear, pruned))
    return model


def rows_of_channels(activation, order, pruned):
    rank = {channel: position for position, channel in enumerate(order)}
    chosen = set(pruned)
    return [{"channel": channel, "mean_activation": float(value), "rank": rank[channel], "pruned": channel in chosen}
            for channel, value in enumerate(activation.tolist())]


def main(argv=None):
    return run_defense(build_parser(), argv, DEFENSE, defend, check_args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
