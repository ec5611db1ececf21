"""TSBD: Two-Stage Backdoor Defense.

Lin, Liu, Wei, Li, Xiong. "Unveiling and Mitigating Backdoor Vulnerabilities based on Unlearning Weight Changes and
Backdoor Activeness", NeurIPS 2024 (arXiv 2405.20291).

Stage 1a  unlearn the clean subset by gradient ascent (lr 1e-4) until the subset's accuracy is <= 0.10.
Stage 1b  neuron weight change (NWC): for every output channel of every Conv2d layer but the shortcut convs, the
          sum of |W_unlearned - W_original|; all channels ranked together.
Stage 1c  in the ORIGINAL backdoored model, zero the weights of the top share n of channels whose change is within
          the top share m of those channels' pooled changes.
Stage 2   activeness-aware fine-tuning on the clean subset: the gradient at theta and at theta + r * g / ||g|| (per
          parameter tensor) are mixed (1 - alpha) : alpha, which penalises the gradient norm.

Choosing n (the reference sweeps it and reads the test set; this script saves one model per run):
`--n X` uses X. Otherwise a rule that reads the clean subset only picks it: a seeded share `select_holdout` (20%)
of the clean subset is held out; for each n of `n_grid`, in increasing order, the original model is re-initialised
with that n and fine-tuned for `select_epochs` epochs with the stage-2 step on the rest; n is accepted while the
held-out accuracy stays >= (the original model's held-out accuracy - `select_tolerance`). The first rejected n
ends the search; the largest accepted n is used (0: nothing re-initialised, when even the smallest is rejected).
Why: a larger n removes more of the weights the unlearning moved most, which is where the backdoor lives; the clean
function those weights also carry must stay recoverable with the clean data we have. The short fine-tuning makes
the check pessimistic (stage 2 trains 21 epochs on all the data), so the rule errs towards smaller n.
`--sweep` adds the reference's analysis: stage-1 test metrics for every n of the grid (stage1_df_m<m>.csv). It
reads the test sets and is never used to choose the saved model.

    python defense/tsbd.py --result_file badnet_0_1 --yaml_path config/defense/tsbd/config.yaml --dataset cifar10
"""
import copy
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python defense/tsbd.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from utils.config import none_or_float, require, require_at_least, require_in, str2bool, within
from utils.defense_run import run_defense
from utils.defense_setup import defense_parser
from utils.errors import run_cli
from utils.models import cpu_state_dict
from utils.precision import autocast
from utils.reporting import save_defense_result, write_table
from utils.selection import LabelledSweep, holdout_split, largest_accepted, sweep_help
from utils.training import EpochTally, accuracy
from utils.unlearning import (UnlearningRule, augmented_accuracy, nwc_layers, rank_neurons, weight_changes,
                              unlearn as unlearn_until_forgotten, write_nwc)

DEFENSE = "tsbd"
MOMENTUM = 0.9  # both stages (the reference's SGD; its YAML's sgd_momentum is never read)
EVAL_EVERY = 10  # stage 2 evaluates the test sets after epochs 0, 10, 20 (the reference)


def build_parser():
    parser = defense_parser("TSBD: unlearn, rank conv channels by weight change, zero the top ones in the original "
                            "model, fine-tune with a gradient-norm penalty.")
    add = parser.add_argument
    add("--epochs", type=int, help="stage 1a: at most this many unlearning epochs")
    add("--lr_un", type=float, help="stage 1a: unlearning learning rate")
    add("--clean_threshold", type=float,
        help="stage 1a: stop once the clean subset's accuracy (eval mode, training augmentation) is <= this")
    add("--skip_layers", type=str, nargs="*",
        help="stage 1b: Conv2d layers with one of these name components are not scored (residual shortcuts)")
    add("--n", type=none_or_float,
        help="stage 1c: share of all scored channels to re-initialise (default: chosen by the clean-subset rule)")
    add("--m", type=float, help="stage 1c: zero the top share m of the selected channels' pooled weight changes")
    add("--n_grid", type=float, nargs="+", help="candidate n values of the selection rule and of --sweep")
    add("--select_holdout", type=float, help="n rule: share of the clean subset held out to check accuracy")
    add("--select_epochs", type=int, help="n rule: stage-2 epochs per candidate on the rest of the clean subset")
    add("--select_tolerance", type=float,
        help="n rule: accept n while held-out accuracy >= the original model's minus this")
    add("--sweep", type=str2bool,
        help=sweep_help("stage-1 test metrics for every n of --n_grid (stage1_df_m<m>.csv)"))
    add("--ft_epoch", type=int, help="stage 2 runs ft_epoch + 1 epochs")
    add("--lr_ft", type=float, help="stage 2: fine-tuning learning rate (constant)")
    add("--r", type=float, help="stage 2: finite-difference radius per parameter tensor")
    add("--alpha", type=float, help="stage 2: weight of the gradient at the perturbed point")
    return parser


def check_args(args):
    require_at_least(args, 1, "epochs")
    require_at_least(args, 0, "ft_epoch", "select_epochs", "r")
    require(args.n is None or within(args.n, "[0, 1]"), f"--n must be in [0, 1], got {args.n}")
    require(args.n_grid and all(within(n, "(0, 1]") for n in args.n_grid),
            f"--n_grid needs values in (0, 1], got {args.n_grid}")
    require_in(args, "m", "[0, 1)")
    require_in(args, "select_holdout", "(0, 1)")
    require_in(args, "alpha", "[0, 1]")


# ---------------------------------------------------------------- stage 1a: clean unlearning

def unlearn(run):
    """A copy of the backdoored model trained with -CE on the clean subset (unshuffled, augmented) until its
    augmented eval-mode accuracy is <= clean_threshold. Returns (model, epoch rows, last accuracy)."""
    setup, args = run.setup, run.args
    model = setup.fresh_backdoored_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr_un, momentum=MOMENTUM)
    rule = UnlearningRule(optimizer, args.clean_threshold, args.epochs, shuffle=False, images_per_sample=2,
                          accuracy=lambda unlearned, _stats: augmented_accuracy(unlearned, setup.clean_subset,
                                                                                setup.augmentation, run.generator))
    rows, clean_acc = unlearn_until_forgotten(run, model, setup.clean_subset, rule)
    return model, rows, clean_acc


# ---------------------------------------------------------------- stage 1b: neuron weight change (utils/unlearning.py)
# ---------------------------------------------------------------- stage 1c: zero re-initialisation

def zero_reinit(model, deltas, ranking, n, m):
    """Zero, in `model`, the weights of the top int(len(ranking) * n) channels whose change is >= tau, tau being
    the value at position int(len * m) of those channels' pooled changes sorted in decreasing order.
    Returns (channels selected, weights zeroed)."""
    count = int(len(ranking) * n)
    selected = {}
    for name, channel, _ in ranking[:count]:
        selected.setdefault(name, []).append(channel)
    if not selected:
        return 0, 0
    index = {name: torch.tensor(channels, device=deltas[name].device) for name, channels in selected.items()}
    pool = torch.cat([deltas[name][rows].flatten() for name, rows in index.items()])
    tau = pool.sort(descending=True).values[int(len(pool) * m)]
    parameters = dict(model.named_parameters())
    zeroed = 0
    with torch.no_grad():
        for name, rows in index.items():
            weight = parameters[name]
            mask = deltas[name][rows] >= tau
            weight[rows] = weight[rows].masked_fill(mask.to(weight.device), 0.0)
            zeroed += int(mask.sum())
    return count, zeroed


# ---------------------------------------------------------------- stage 2: activeness-aware fine-tuning

def gradients(model, params, x, y, amp):
    with autocast(x.device, amp, unscaled=True):
        loss = F.cross_entropy(model(x), y)
    return torch.autograd.grad(loss, params, allow_unused=True)


def activeness_aware_step(model, temp, optimizer, x, y, r, alpha, amp=False):
    """One update of `model` with (1 - alpha) g1 + alpha g2: g1 = grad CE at theta, g2 = grad CE at
    theta + r * g1_p / ||g1_p|| per parameter tensor p. Both gradients come from `temp`, a copy of `model` (train
    mode) whose parameters are overwritten here, so `model`'s BatchNorm statistics are left alone."""
    params = [p for p in model.parameters() if p.requires_grad]
    temp_params = [p for p in temp.parameters() if p.requires_grad]
    with torch.no_grad():
        for t, p in zip(temp_params, params):
            t.copy_(p)
    g1 = gradients(temp, temp_params, x, y, amp)
    with torch.no_grad():
        for t, g in zip(temp_params, g1):
            norm = g.norm() if g is not None else 0.0
            if norm > 0:  # an unused or flat tensor stays where it is
                t.add_(g, alpha=r / float(norm))
    g2 = gradients(temp, temp_params, x, y, amp)
    optimizer.zero_grad(set_to_none=True)
    for p, a, b in zip(params, g1, g2):
        if a is not None:
            p.grad = (1 - alpha) * a + alpha * b
    optimizer.step()


def finetune(model, data, args, augmentation, generator, epochs, after_epoch=None):
    """`epochs` epochs of activeness-aware SGD (lr_ft, constant) over `data`, unshuffled and augmented; after each
    step one train-mode forward pass (the only BatchNorm update) gives the logged loss and accuracy.
    after_epoch(epoch, EpochStats) runs after each epoch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr_ft, momentum=MOMENTUM)
    temp = copy.deepcopy(model).train()
    for epoch in range(epochs):
        model.train()  # after_epoch may have evaluated it
        tally = EpochTally()
        for x, y in data.batches(args.batch_size, augment=augmentation, generator=generator):
            activeness_aware_step(model, temp, optimizer, x, y, args.r, args.alpha, args.amp)
            with torch.no_grad(), autocast(x.device, args.amp, unscaled=True):
                logits = model(x)
            tally.add(F.cross_entropy(logits.float(), y), logits, y)
        if after_epoch is not None:
            after_epoch(epoch, tally.stats())
    return model


# ---------------------------------------------------------------- choosing n from the clean subset only

def choose_n(run, deltas, ranking):
    """The selection rule of the module docstring. Returns (n, evidence for summary.json)."""
    setup, args = run.setup, run.args
    data = setup.clean_subset
    generator = torch.Generator().manual_seed(args.random_seed)  # its own draws: stage 2 does not depend on the rule
    train, heldout = holdout_split(data, args.select_holdout, generator, "the clean subset (--select_holdout)")
    held = len(heldout)
    reference = accuracy(setup.model, heldout)
    run.logger.info(f"n rule: original model's accuracy on {held} held-out clean samples {reference:.4f}; "
                    f"accept n while >= {reference - args.select_tolerance:.4f}")

    def heldout_accuracy(n):
        model = setup.fresh_backdoored_model()
        count, zeroed = zero_reinit(model, deltas, ranking, n, args.m)
        finetune(model, train, args, setup.augmentation, generator, args.select_epochs)
        acc = accuracy(model, heldout)
        run.count_images("select_n", 3 * len(train) * args.select_epochs + held)
        run.logger.info(f"n rule: n {n}: {count} channels, {zeroed} weights zeroed, held-out acc {acc:.4f}")
        return acc, {"n_number": count, "reinit_weight_num": zeroed}

    n, rows = largest_accepted(args.n_grid, heldout_accuracy, reference, args.select_tolerance)
    run.count_images("select_n", held)
    write_table(rows, run.path / "n_selection.csv")
    run.logger.info(f"n rule chose n = {n}" + ("" if n else " (even the smallest candidate lost too much "
                                                             "held-out accuracy: nothing is re-initialised)"))
    return n, {"reference_heldout_acc": reference, "heldout": held, "tolerance": args.select_tolerance,
               "epochs": args.select_epochs, "candidates": rows}


def stage1_test_metrics(run, deltas, ranking, n):
    """stage1_df_m<m>.csv (test metrics of re-initialised models, before stage 2): the defended n, and with --sweep
    every n of the grid (analysis only: reads the test sets, chooses nothing)."""
    args = run.args
    analysis = LabelledSweep(run, "stage1_test", f"stage1_df_m{args.m}.csv", "n before stage 2")
    rows = []
    for value in sorted(set(args.n_grid) | {n}) if args.sweep else [n]:
        model = run.setup.fresh_backdoored_model()
        count, zeroed = zero_reinit(model, deltas, ranking, value, args.m)
        row = {"n": value, "n_number": count, "m": args.m, "reinit_weight_num": zeroed}
        analysis.measure(model, row, f"stage 1 (test data{', analysis only' if value != n else ''}): n {value}: "
                                     f"{count} channels, {zeroed} weights zeroed")
        rows.append({**row, "defended": value == n})
    analysis.write(rows)


# ---------------------------------------------------------------- the defense

def defend(run):
    setup, args = run.setup, run.args
    original = nwc_layers(setup.model, args.skip_layers)  # fails early for a model without conv layers

    with run.phase("unlearn"):
        unlearned, unlearn_rows, unlearned_acc = unlearn(run)
    save_defense_result(run.path, setup.record.model_name, setup.record.num_classes, cpu_state_dict(unlearned),
                        "unlearned_model.pt")
    run.add_epoch_table("unlearn_df", unlearn_rows)

    with run.phase("nwc"):
        deltas = weight_changes(original, dict(unlearned.named_parameters()))
        ranking = rank_neurons(deltas)
        write_nwc(run.path / "nwc.txt", ranking)
    del unlearned
    run.logger.info(f"NWC: {len(ranking)} channels in {len(deltas)} conv layers; top 5: {ranking[:5]}")

    if args.n is None:
        with run.phase("select_n"):
            n, evidence = choose_n(run, deltas, ranking)
        run.summary.update(n_source="clean-subset rule", n_rule=evidence)
    else:
        n = args.n
        run.summary.update(n_source="--n")

    with run.phase("stage1_test"):
        stage1_test_metrics(run, deltas, ranking, n)

    model = setup.fresh_backdoored_model()
    count, zeroed = zero_reinit(model, deltas, ranking, n, args.m)
    run.summary.update(n=n, channels_scored=len(ranking), channels_reinitialised=count, weights_zeroed=zeroed,
                       unlearning_epochs=len(unlearn_rows), unlearned_clean_subset_acc=unlearned_acc)
    run.logger.info(f"stage 1c: n {n}: {count} channels selected, {zeroed} weights zeroed")

    rows = []

    def record_epoch(epoch, stats):
        run.end_epoch(rows, "finetune", epoch, stats, model, f"stage 2 epoch {epoch}: loss {stats.loss:.4f}, train "
                      f"acc {stats.acc:.4f} ({stats.seconds:.1f} s)", images=3 * stats.samples,  # 3 passes a step
                      force_eval=epoch % EVAL_EVERY == 0 and epoch != args.ft_epoch)  # the frame evaluates the last

    with run.phase("finetune"):
        finetune(model, setup.clean_subset, args, setup.augmentation, run.generator, args.ft_epoch + 1, record_epoch)
    # the same rows under the reference's name and the toolkit's (the frame adds the final metrics to both)
    run.add_epoch_table(f"stage2_df_ft{args.ft_epoch}_r{args.r}_alpha{args.alpha}_m{args.m}", rows)
    run.add_epoch_table("tsbd_df", rows)
    return model


def main(argv=None):
    return run_defense(build_parser(), argv, DEFENSE, defend, check_args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
