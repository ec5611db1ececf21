"""Pruning of BatchNorm channels, for the defenses that score neurons by a per-channel mask (RNP, ANP, ...).

- `batchnorm_layers(model, who)`: the BatchNorm layers a defense can mask and prune, or one clear UserError.
- `BatchNormMasks(model, noise=False)`: a learnable mask in [0, 1] on every BatchNorm channel's scale (optionally
  with ANP's multiplicative perturbation), put on by forward hooks: any architecture works without rewriting its
  classes, and removing the hooks gives the model back unchanged.
- `prune_channels(model, channels, zero_bias=False)`: zero the scale (gamma) of chosen channels.
- `pruning_order`, `channels_to_prune`, `candidate_amounts` (utils/selection.py: the rule): which channels, how many.
- `add_pruning_options` / `check_pruning_args` / `prune_by_masks`: the pruning step of a mask-scoring defense as a
  whole: a fixed threshold or number, or a clean-subset rule, plus the labelled test-data sweep.
"""
import math

import torch
import torch.nn as nn

from utils.config import none_or_float, require, require_at_least, require_in, str2bool, within
from utils.errors import UserError
from utils.reporting import write_table
from utils.selection import LabelledSweep, holdout_split, largest_within_tolerance, sweep_help
from utils.training import accuracy


def batchnorm_layers(model, who="this defense"):
    """{qualified name: module} of every BatchNorm layer with a learnable per-channel scale, in module order.
    A model without any gets one UserError that says why `who` cannot run on it."""
    layers = {name: module for name, module in model.named_modules()
              if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine}
    if not layers:
        raise UserError(f"{who} masks and prunes BatchNorm channels, but this model "
                        f"({type(model).__name__}) has no BatchNorm layer with a learnable scale; "
                        "use a model with BatchNorm (e.g. preactresnet18, vgg19_bn, resnet18)")
    return layers


class BatchNormMasks:
    """A mask m in [0, 1] (initially 1) on the scale of every BatchNorm channel: the layer's output
    gamma * x_hat + beta becomes m * gamma * x_hat + beta.

    With `noise`, a multiplicative perturbation (ANP's neuron perturbation) that applies while `perturbed` is true:
    (m + delta) * gamma * x_hat + (1 + xi) * beta, delta and xi per channel. The masks and noises are plain leaf
    tensors on the model's device (`masks`, `weight_noise`, `bias_noise`: {layer name: tensor}). Use as a context
    manager, or call remove(), to take the hooks off again.
    """

    def __init__(self, model, who="this defense", noise=False):
        self.layers = batchnorm_layers(model, who)
        self.masks, self.weight_noise, self.bias_noise = {}, {}, {}
        self.perturbed = False
        self._handles = []
        for name, module in self.layers.items():
            zeros = torch.zeros(module.num_features, device=module.weight.device)
            self.masks[name] = (zeros + 1).requires_grad_()
            if noise:
                self.weight_noise[name] = zeros.clone().requires_grad_()
                self.bias_noise[name] = zeros.clone().requires_grad_()
            self._handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def apply(module, inputs, output):
            shape = (1, -1) + (1,) * (output.dim() - 2)  # channels are dim 1 for BatchNorm1d/2d/3d
            beta = module.bias.view(shape)
            scale, shift = self.masks[name], None
            if self.perturbed:
                scale = scale + self.weight_noise[name]
                shift = beta * self.bias_noise[name].view(shape)
            # output - beta is gamma * x_hat: rescale it, keep beta (perturbed: (1 + xi) * beta)
            masked = (output - beta) * scale.view(shape) + beta
            return masked if shift is None else masked + shift
        return apply

    def parameters(self):
        return list(self.masks.values())

    def noise_parameters(self):
        return list(self.weight_noise.values()) + list(self.bias_noise.values())

    @torch.no_grad()
    def clip_(self, low=0.0, high=1.0):
        for mask in self.masks.values():
            mask.clamp_(low, high)

    def values(self):
        """{layer name: CPU float tensor of its mask values}."""
        return {name: mask.detach().float().cpu().clone() for name, mask in self.masks.items()}

    def remove(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


def mask_table(values, pruned=None):
    """Rows (layer, channel, mask[, pruned]) of {layer: mask values}; `pruned` is {layer: channel indices}."""
    rows = []
    for layer, mask in values.items():
        chosen = set((pruned or {}).get(layer, ()))
        for channel, value in enumerate(mask.tolist()):
            row = {"layer": layer, "channel": channel, "mask": value}
            if pruned is not None:
                row["pruned"] = channel in chosen
            rows.append(row)
    return rows


@torch.no_grad()
def prune_channels(model, channels, zero_bias=False):
    """Set the BatchNorm scale (gamma) of the given channels to zero, {layer name: [channel indices]}: in eval
    mode each then outputs its shift beta whatever the input (and zero with `zero_bias`)."""
    modules = dict(model.named_modules())
    for name, indices in channels.items():
        if not indices:
            continue
        module = modules.get(name)
        if not isinstance(module, nn.modules.batchnorm._BatchNorm) or not module.affine:
            raise UserError(f"cannot prune {name!r}: not a BatchNorm layer with a learnable scale in this model")
        index = torch.as_tensor(list(indices), dtype=torch.long, device=module.weight.device)
        if len(index) and (index.min() < 0 or index.max() >= module.num_features):
            raise UserError(f"cannot prune {name!r}: channels must be in [0, {module.num_features})")
        module.weight[index] = 0.0
        if zero_bias:
            module.bias[index] = 0.0
    return model


def pruning_order(values):
    """Every (layer, channel, mask value), lowest mask first; ties keep module then channel order."""
    entries = [(layer, channel, value) for layer, mask in values.items() for channel, value in enumerate(mask.tolist())]
    return sorted(entries, key=lambda entry: entry[2])  # sorted() is stable


def channels_to_prune(values, by, amount):
    """{layer: [channels]} to prune: by 'threshold' every channel whose mask is <= amount (as the ANP and RNP
    reference code compares), by 'number' the `amount` channels of lowest mask."""
    order = pruning_order(values)
    if by == "threshold":
        limit = torch.tensor(float(amount), dtype=torch.float32).item()  # masks are float32: 0.2 means float32(0.2)
        chosen = [entry for entry in order if entry[2] <= limit]
    elif by == "number":
        chosen = order[:int(amount)]
    else:
        raise UserError(f"pruning_by must be 'threshold' or 'number', not {by!r}")
    channels = {}
    for layer, channel, _ in chosen:
        channels.setdefault(layer, []).append(channel)
    return {layer: sorted(indices) for layer, indices in channels.items()}


def count_channels(channels):
    return sum(len(indices) for indices in channels.values())


def candidate_amounts(by, pruning_max, pruning_step):
    """The pruning amounts 0, step, 2 step, ... up to pruning_max (thresholds, or whole numbers of channels)."""
    require(pruning_step > 0 and pruning_max >= 0, "--pruning_step must be > 0 and --pruning_max >= 0")
    count = int(math.floor(pruning_max / pruning_step + 1e-9))
    amounts = [round(i * pruning_step, 10) for i in range(count + 1)]
    return [int(a) for a in amounts] if by == "number" else amounts


# ---------------------------------------------------------------- the pruning step of a mask-scoring defense

def add_pruning_options(parser):
    add = parser.add_argument
    add("--pruning_by", type=str, choices=["threshold", "number"],
        help="prune channels whose mask is <= a threshold, or a number of lowest-mask channels")
    add("--pruning_number", type=float,
        help="the threshold (pruning_by threshold) or the number of channels (pruning_by number) to prune")
    add("--acc_tolerance", type=none_or_float,
        help="instead of --pruning_number: the largest amount on the --pruning_max/--pruning_step grid whose "
             "accuracy on a held-out part of the clean subset drops by at most this (absolute) from the unpruned "
             "model's (none: use --pruning_number)")
    add("--holdout_ratio", type=float,
        help="with --acc_tolerance: share of the clean subset held out from mask learning to judge the pruning")
    add("--pruning_max", type=float, help="largest threshold/number on the grid of --acc_tolerance and --sweep")
    add("--pruning_step", type=float, help="step of that grid")
    add("--sweep", type=str2bool,
        help=sweep_help("write pruning_sweep.csv with test ACC/ASR/RA at every grid amount (BackdoorBench picks "
                        "its amount this way)"))
    add("--prune_bias", type=str2bool,
        help="also zero the pruned channels' BatchNorm shift (default false: zero the scale only, as the "
             "reference code does)")


def check_pruning_args(args):
    by, number = args.pruning_by, args.pruning_number
    require(by != "number" or (number >= 0 and float(number).is_integer()),
            f"--pruning_by number needs a whole --pruning_number >= 0 (channels to prune), got {number}")
    require(by != "threshold" or within(number, "[0, 1]"),
            f"--pruning_number is a mask threshold in [0, 1] with --pruning_by threshold, got {number}")
    if args.acc_tolerance is not None:
        require_at_least(args, 0, "acc_tolerance", why="an absolute accuracy drop")
        require_in(args, "holdout_ratio", "(0, 1)")
    if args.acc_tolerance is not None or args.sweep:
        candidate_amounts(by, args.pruning_max, args.pruning_step)
        require(by != "number" or (float(args.pruning_step).is_integer() and float(args.pruning_max).is_integer()),
                "--pruning_by number needs whole --pruning_max and --pruning_step (channel counts)")


def split_for_rule(data, args, generator):
    """(data to learn the masks on, held-out data or None): a random --holdout_ratio share is held out only when
    --acc_tolerance chooses the pruning amount; otherwise every clean sample goes to mask learning."""
    if args.acc_tolerance is None:
        return data, None
    return holdout_split(data, args.holdout_ratio, generator, "the clean subset (--holdout_ratio)")


def prune_by_masks(run, values, holdout=None):
    """Prune a fresh copy of the backdoored model by the mask values {layer: tensor} and return it; the decision
    goes to run.summary["pruning"], every channel's mask and fate to mask_values.csv. The amount is
    --pruning_number, or with --acc_tolerance the largest grid amount whose held-out clean accuracy stays within
    the tolerance of the unpruned model's (none within it: nothing is pruned). --sweep also evaluates the test
    sets at every grid amount into pruning_sweep.csv (utils/selection.LabelledSweep), an analysis the saved model
    does not depend on. Timed as phases prune and sweep."""
    args, log = run.args, run.logger
    by = args.pruning_by
    decision = {"pruning_by": by, "rule": "fixed", "prune_bias": args.prune_bias}
    amount = int(args.pruning_number) if by == "number" else args.pruning_number
    use_grid = args.acc_tolerance is not None or args.sweep
    grid = candidate_amounts(by, args.pruning_max, args.pruning_step) if use_grid else []
    rows = []
    sweep = LabelledSweep(run, "sweep", "pruning_sweep.csv", "pruning amount") if args.sweep else None
    model, done = None, {}
    for value in grid:
        with run.phase("prune"):
            # grid amounts prune nested sets of channels: one copy is pruned further at each step
            if model is None:
                model = run.setup.fresh_backdoored_model()
            channels = channels_to_prune(values, by, value)
            prune_channels(model, {layer: [c for c in indices if c not in done.get(layer, ())]
                                   for layer, indices in channels.items()}, args.prune_bias)
            done = {layer: set(indices) for layer, indices in channels.items()}
            row = {"pruning_by": by, "amount": value, "pruned": count_channels(channels)}
            if holdout is not None:
                row["holdout_acc"] = accuracy(model, holdout, args.eval_batch_size)
                run.count_images("prune", len(holdout))
        if sweep:
            with run.phase("sweep"):
                sweep.measure(model, row, f"sweep (TEST data, analysis only) {by} {value}: {row['pruned']} "
                                          "channels pruned")
        rows.append(row)
    if sweep:
        sweep.write(rows)

    with run.phase("prune"):
        if args.acc_tolerance is not None:
            baseline = accuracy(run.setup.fresh_backdoored_model(), holdout, args.eval_batch_size)
            accuracies = [row["holdout_acc"] for row in rows]
            amount = largest_within_tolerance(grid, accuracies, baseline, args.acc_tolerance)
            decision.update(rule="acc_tolerance", acc_tolerance=args.acc_tolerance, holdout_samples=len(holdout),
                            holdout_acc_unpruned=baseline,
                            holdout_acc_chosen=baseline if amount is None else accuracies[grid.index(amount)])
            log.info(f"clean-subset rule: held-out accuracy {baseline:.4f} unpruned; largest {by} within "
                     f"{args.acc_tolerance} of it: {amount} (held-out accuracy {decision['holdout_acc_chosen']:.4f})")
        channels = {} if amount is None else channels_to_prune(values, by, amount)
        model = prune_channels(run.setup.fresh_backdoored_model(), channels, args.prune_bias)
    total = sum(len(mask) for mask in values.values())
    decision.update(pruning_amount=amount, pruned_channels=count_channels(channels), total_channels=total,
                    pruned_per_layer={layer: len(indices) for layer, indices in channels.items()})
    log.info(f"pruned {count_channels(channels)} of {total} BatchNorm channels ({by} {amount}): "
             + (", ".join(f"{layer} {len(indices)}" for layer, indices in channels.items()) or "none"))
    run.summary.update(pruning=decision)
    write_table(mask_table(values, channels), run.path / "mask_values.csv")
    return model
