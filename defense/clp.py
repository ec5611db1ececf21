"""CLP: Channel Lipschitzness-based Pruning (data-free).

Zheng, Tang, Li, Liu. "Data-free Backdoor Removal based on Channel Lipschitzness", ECCV 2022.
For every Conv2d whose output feeds a BatchNorm2d, each output channel's Lipschitz upper bound is the largest
singular value of its filter (reshaped to in_channels x k*k) scaled by |gamma| / sigma of the BatchNorm; channels
whose bound exceeds mean + u * std of their layer are pruned (the BatchNorm's weight and bias set to zero).

Which BatchNorm belongs to which conv (`--pairing`):
- `traced` (default): a forward pass on one blank image follows the data: a BatchNorm is paired with the conv whose
  output it receives, directly or through channel-wise modules (pooling, activations, dropout: they scale every
  channel of a layer alike, so the within-layer outlier rule is unchanged). In a pre-activation network
  (PreAct-ResNet18: bn1 -> conv1 -> bn2 -> conv2) this pairs each conv1 with its bn2 and the stem conv with
  layer1.0.bn1; the other bn1 layers normalise a residual sum, which no single conv's bound describes, and are not
  scored.
- `module_order`: the authors' and BackdoorBench's rule: each BatchNorm2d with the last Conv2d before it in
  named_modules order (in PreAct-ResNet18 that pairs every bn1 with the previous block's conv2 or shortcut conv).

    python defense/clp.py --result_file badnet_0_1 --yaml_path config/defense/clp/cifar10.yaml --dataset cifar10
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python defense/clp.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn as nn

from utils.config import require, str2bool
from utils.defense_run import run_defense
from utils.defense_setup import defense_parser
from utils.errors import UserError, run_cli
from utils.model_graph import module_order_pairs, traced_pairs
from utils.pruning import prune_channels
from utils.reporting import write_table
from utils.selection import LabelledSweep, sweep_help
from utils.training import accuracy

DEFENSE = "clp"




def build_parser():
    parser = defense_parser("CLP: prune channels with an outlying Lipschitz upper bound (data-free).")
    add = parser.add_argument
    add("--u", type=float, help="prune channels whose bound exceeds mean + u * std of their layer")
    add("--pairing", type=str, choices=["traced", "module_order"],
        help="pair each BatchNorm2d with the conv that feeds it (traced) or the conv before it in module order")
    add("--sweep", type=str2bool,
        help=sweep_help("evaluate the TEST sets for u in linspace(u_min, u_max, u_num) "
                        "(u_sweep_test_metrics.csv)"))
    add("--u_min", type=float, help="sweep (analysis only): the smallest u")
    add("--u_max", type=float, help="sweep (analysis only): the largest u")
    add("--u_num", type=int, help="sweep (analysis only): how many u values, evenly spaced")
    return parser


def check_args(args):
    require(np.isfinite(args.u), "--u must be a finite number")
    require(not args.sweep or (args.u_num >= 1 and args.u_min <= args.u_max),
            "--sweep needs --u_num >= 1 and --u_min <= --u_max")


def conv_bn_pairs(model, img_size, pairing="traced"):
    """[(conv name, conv, BatchNorm name, BatchNorm)] of the conv -> BatchNorm2d pairs CLP scores, in order."""
    modules = dict(model.named_modules())
    has_conv = any(isinstance(m, nn.Conv2d) for m in modules.values())
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in modules.values())
    if not (has_conv and has_bn):
        raise UserError(f"CLP needs Conv2d layers followed by BatchNorm2d; this model has "
                        f"{'no Conv2d' if not has_conv else 'no BatchNorm2d'} (CLP does not apply to it)")
    names = traced_pairs(model, img_size) if pairing == "traced" else module_order_pairs(model)
    pairs = [(conv, modules[conv], bn, modules[bn]) for conv, bn in names if scorable(modules[conv], modules[bn])]
    if not pairs:
        raise UserError("CLP found no Conv2d whose output feeds a BatchNorm2d (with affine weights and running "
                        "statistics) in this model: nothing to score")
    return pairs


def scorable(conv, bn):
    return conv.out_channels == bn.num_features and bn.weight is not None and bn.running_var is not None


def channel_lipschitz_bounds(conv, bn):
    """Per output channel k: largest singular value of W_k (in_channels/groups x kh*kw) * |gamma_k| / sigma_k,
    sigma_k = sqrt(running_var_k + eps), the BatchNorm's scale in eval mode (the authors' code omits eps)."""
    weight = conv.weight.detach().float().cpu()
    scale = bn.weight.detach().float().cpu().abs() / torch.sqrt(bn.running_var.detach().float().cpu() + bn.eps)
    matrices = weight.reshape(weight.shape[0], weight.shape[1], -1) * scale[:, None, None]
    return torch.linalg.svdvals(matrices)[:, 0]


def outlier_channels(bounds, u):
    """Channels whose bound exceeds mean + u * std of the layer (unbiased std, as the authors' torch code)."""
    threshold = bounds.mean() + u * bounds.std()
    return torch.nonzero(bounds > threshold).flatten().tolist(), float(threshold)


def prune(model, scored, u):
    """Prune `model`'s outlying channels at `u` from precomputed bounds {bn name: bounds}: zero their BatchNorm
    weight and bias (in eval mode they output 0). Returns {bn name: (channels, threshold)} of every scored one."""
    decisions = {bn_name: outlier_channels(bounds, u) for bn_name, bounds in scored.items()}
    prune_channels(model, {bn_name: channels for bn_name, (channels, _) in decisions.items()}, zero_bias=True)
    return decisions


def sweep(run, scored):
    """Analysis only (uses the TEST sets): metrics of the model pruned at each u, into u_sweep_test_metrics.csv;
    the saved model is not touched."""
    setup, args = run.setup, run.args
    analysis = LabelledSweep(run, "sweep_analysis", "u_sweep_test_metrics.csv", "u")
    rows = []
    for u in np.linspace(args.u_min, args.u_max, args.u_num):
        model = setup.fresh_backdoored_model()
        pruned = sum(len(channels) for channels, _ in prune(model, scored, float(u)).values())
        row = {"u": float(u), "pruned_channels": pruned,
               "clean_subset_acc": accuracy(model, setup.clean_subset, args.eval_batch_size)}
        run.count_images("sweep_analysis", len(setup.clean_subset))
        analysis.measure(model, row, f"sweep (TEST data, analysis only) u {u:.2f}: {pruned} channels pruned")
        rows.append({**row, "note": "analysis only: test data, not used for the saved model"})
    analysis.write(rows)


def defend(run):
    setup, args = run.setup, run.args
    model = setup.model
    with run.phase("clean_subset_check"):
        acc_before = accuracy(model, setup.clean_subset, args.eval_batch_size)
    run.count_images("clean_subset_check", len(setup.clean_subset))

    with run.phase("prune"):
        pairs = conv_bn_pairs(model, setup.record.img_size, args.pairing)
        scored = {bn_name: channel_lipschitz_bounds(conv, bn) for _, conv, bn_name, bn in pairs}
        decisions = prune(model, scored, args.u)
    table = []
    for conv_name, _, bn_name, _ in pairs:
        channels, threshold = decisions[bn_name]
        run.logger.info(f"{conv_name} -> {bn_name}: threshold {threshold:.4f}, pruned channels {channels}")
        table += [{"layer": conv_name, "bn": bn_name, "channel": channel, "lipschitz_upper_bound": float(value),
                   "threshold": threshold, "pruned": channel in channels}
                  for channel, value in enumerate(scored[bn_name])]
    write_table(table, run.path / "channel_lipschitz.csv")

    with run.phase("clean_subset_check"):
        acc_after = accuracy(model, setup.clean_subset, args.eval_batch_size)
    run.count_images("clean_subset_check", len(setup.clean_subset))
    pruned = {bn_name: channels for bn_name, (channels, _) in decisions.items() if channels}
    run.logger.info(f"{len(pairs)} conv -> BatchNorm pairs scored ({args.pairing}), "
                    f"{sum(map(len, pruned.values()))} of {len(table)} channels pruned at u {args.u}; clean-subset "
                    f"accuracy {acc_before:.4f} -> {acc_after:.4f}")
    run.summary.update(u=args.u, pairing=args.pairing, pairs_scored=len(pairs), channels_scored=len(table),
                       pruned_channels=pruned, pruned_count=sum(map(len, pruned.values())),
                       clean_subset_acc_before=acc_before, clean_subset_acc_after=acc_after)

    if args.sweep:
        run.logger.info("--sweep: evaluating the TEST sets for each u (analysis only; the saved model uses "
                        f"u {args.u})")
        with run.phase("sweep_analysis"):
            sweep(run, scored)
    return model


def main(argv=None):
    return run_defense(build_parser(), argv, DEFENSE, defend, check_args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
