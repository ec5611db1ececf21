"""NC: Neural Cleanse.

Wang, Yao, Shan, Li, Viswanath, Zheng, Zhao. "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural
Networks", IEEE S&P 2019.
For every class, reverse-engineer the smallest trigger (a mask m in [0, 1]^{HxW} and a pattern in pixel space) that
sends the clean subset to that class: minimise CE + cost * |m|_1 under the paper's cost schedule. A class whose mask
is a small outlier (MAD anomaly index above 2, below the median) is a backdoor target; unlearn it by fine-tuning on
the clean subset in which a share of the images carries its reversed trigger and keeps its true label. When no class
is flagged the model is returned unchanged.
All classes are optimised together (K stamped copies of one batch in one forward pass) within a step budget per class
(docs/defenses.md, "Faithfulness: NC").

    python defense/nc.py --result_file badnet_0_1 --yaml_path config/defense/nc/cifar10.yaml --dataset cifar10
"""
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python defense/nc.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils.config import require_above, require_at_least, require_in
from utils.defense_run import run_defense
from utils.defense_setup import defense_parser
from utils.errors import run_cli
from utils.outliers import anomaly_index, small_outliers
from utils.precision import autocast
from utils.reporting import write_table
from utils.reversed_triggers import (ReversedTriggers, bounded, save_trigger_grid, stamp_normalised, stamp_pixels,
                                     unbounded)
from utils.tensor_data import DeviceImages
from utils.training import eval_mode, fine_tune

DEFENSE = "nc"
ADAM_BETAS = (0.5, 0.9)  # the paper's code and BackdoorBench's


def build_parser():
    parser = defense_parser("NC: reverse-engineer a minimal trigger per class, flag small outliers, unlearn them.")
    add = parser.add_argument
    add("--mask_lr", type=float, help="Adam learning rate of the masks and patterns (betas 0.5, 0.9)")
    add("--init_cost", type=float, help="starting weight of the mask L1 norm in the loss")
    add("--cost_multiplier", type=float,
        help="the cost is multiplied by this after --patience successful rounds, divided by its 1.5th power after "
             "--patience failed ones")
    add("--patience", type=int, help="rounds of success (or failure) before the cost goes up (or down)")
    add("--atk_succ_threshold", type=float,
        help="share of stamped clean images sent to the class that makes a round successful (a fraction: "
             "BackdoorBench's 98.0 is 0.98)")
    add("--early_stop_threshold", type=float,
        help="a round improves the best mask norm only if it is below this share of the best so far")
    add("--early_stop_patience", type=int,
        help="stop a class after this many rounds without improvement (once the cost went both up and down)")
    add("--mask_batch_size", type=int, help="clean images per class in each step (all classes share them)")
    add("--round_steps", type=int, help="steps per round, the unit of the cost schedule and early stop "
                                        "(BackdoorBench's unit: an epoch over the clean subset)")
    add("--mask_rounds", type=int, help="at most this many rounds per class (the step budget)")
    add("--anomaly_threshold", type=float,
        help="flag a class whose mask norm is below the median with an anomaly index above this")
    add("--unlearning_ratio", type=float,
        help="share of the clean subset stamped with a flagged class's reversed trigger (true labels kept)")
    add("--epochs", type=int, help="unlearning fine-tuning epochs (only when a class is flagged)")
    add("--lr", type=float, help="unlearning SGD learning rate")
    add("--sgd_momentum", type=float, help="unlearning SGD momentum")
    add("--wd", type=float, help="unlearning weight decay")
    add("--lr_scheduler", type=str, choices=["CosineAnnealingLR", "none"], help="unlearning schedule, per epoch")
    return parser


def check_args(args):
    require_at_least(args, 1, "patience", "early_stop_patience", "mask_batch_size", "round_steps", "mask_rounds")
    require_above(args, 0, "mask_lr", "init_cost")
    require_above(args, 1, "cost_multiplier")
    require_in(args, "atk_succ_threshold", "(0, 1]", why="a fraction: BackdoorBench's 98.0 is 0.98")
    require_in(args, "early_stop_threshold", "(0, 1]")
    require_in(args, "unlearning_ratio", "(0, 1]")
    require_at_least(args, 0, "epochs")


# ---------------------------------------------------------------- reverse engineering

@dataclass
class ClassSearch:
    """NC's bookkeeping for one class after each round: the best mask norm, the cost schedule and the early stop
    (the paper's code, with a round of steps where it has an epoch)."""
    cost: float
    multiplier: float
    rounds: int = 0
    best_norm: float = math.inf
    early_stop_best: float = math.inf
    early_stop_counter: int = 0
    up_counter: int = 0
    down_counter: int = 0
    went_up: bool = False
    went_down: bool = False
    stopped: str = ""  # why the search ended: "early stop" or "budget"

    def end_round(self, success, norm, args):
        """Update after a round with mean attack success `success` and mean mask norm `norm`; returns whether this
        round's mask is the new best (successful and smaller)."""
        self.rounds += 1
        improved = success >= args.atk_succ_threshold and norm < self.best_norm
        if improved:
            self.best_norm = norm
        if self.best_norm < math.inf:
            stalled = self.best_norm >= args.early_stop_threshold * self.early_stop_best
            self.early_stop_counter = self.early_stop_counter + 1 if stalled else 0
            self.early_stop_best = min(self.early_stop_best, self.best_norm)
        if self.went_up and self.went_down and self.early_stop_counter >= args.early_stop_patience:
            self.stopped = "early stop"
            return improved
        if success >= args.atk_succ_threshold:
            self.up_counter, self.down_counter = self.up_counter + 1, 0
        else:
            self.up_counter, self.down_counter = 0, self.down_counter + 1
        if self.up_counter >= args.patience:
            self.up_counter, self.cost, self.went_up = 0, self.cost * self.multiplier, True
        elif self.down_counter >= args.patience:
            self.down_counter, self.cost, self.went_down = 0, self.cost / self.multiplier ** 1.5, True
        if self.rounds >= args.mask_rounds:
            self.stopped = "budget"
        return improved


def endless_batches(data, batch_size, generator):
    while True:
        yield from data.batches(batch_size, shuffle=True, generator=generator)


def reverse_engineer(model, data, num_classes, args, generator, log, amp=False):
    """Optimise a mask and a pattern for every class at once: each step stamps all active classes' triggers on one
    batch of the clean subset and takes one Adam step on sum_k (CE_k + cost_k * |m_k|_1). A class leaves the batch
    when NC's early stop fires or its round budget is spent."""
    device = data.device
    _, height, width, channels = data.images.shape
    raw_mask = unbounded(torch.rand(num_classes, 1, height, width, generator=generator)).to(device)
    raw_pattern = unbounded(torch.rand(num_classes, channels, height, width, generator=generator)).to(device)
    raw_mask.requires_grad_(True)
    raw_pattern.requires_grad_(True)
    # Adam acts elementwise, so one Adam over the stacked parameters is K independent ones
    optimizer = torch.optim.Adam([raw_mask, raw_pattern], lr=args.mask_lr, betas=ADAM_BETAS)
    searches = [ClassSearch(args.init_cost, args.cost_multiplier) for _ in range(num_classes)]
    best_masks, best_patterns = bounded(raw_mask.detach()), bounded(raw_pattern.detach())
    reached = [False] * num_classes
    batches = endless_batches(data, args.mask_batch_size, generator)
    images = 0
    bar = tqdm(total=args.mask_rounds, desc="nc rounds", leave=False, disable=not args.progress)
    with eval_mode(model), bar:  # the bar closes and the model's mode comes back, also on an error
        while active := [k for k, search in enumerate(searches) if not search.stopped]:
            index = torch.tensor(active, device=device)
            costs = torch.tensor([searches[k].cost for k in active], device=device)
            success_sum = torch.zeros(len(active), device=device)
            norm_sum = torch.zeros(len(active), device=device)
            for _ in range(args.round_steps):
                x, _ = next(batches)
                masks, patterns = bounded(raw_mask[index]), bounded(raw_pattern[index])
                targets = index.repeat_interleave(len(x))
                with autocast(device, amp, unscaled=True):
                    logits = model(stamp_normalised(x, masks, patterns, data))
                ce = F.cross_entropy(logits.float(), targets, reduction="none").view(len(active), len(x)).mean(1)
                norms = masks.flatten(1).sum(1)
                # gradients of the triggers only: the model's weight gradients would cost a third more
                raw_mask.grad, raw_pattern.grad = torch.autograd.grad((ce + costs * norms).sum(),
                                                                      [raw_mask, raw_pattern])
                optimizer.step()
                success_sum += (logits.detach().argmax(1) == targets).float().view(len(active), len(x)).mean(1)
                norm_sum += norms.detach()
                images += len(targets)
            current_masks, current_patterns = bounded(raw_mask.detach()), bounded(raw_pattern.detach())
            successes, mean_norms = (success_sum / args.round_steps).tolist(), (norm_sum / args.round_steps).tolist()
            log.info(f"round {searches[active[0]].rounds + 1}: class (success, mean mask norm) "
                     + ", ".join(f"{k} ({s:.3f}, {n:.1f})" for k, s, n in zip(active, successes, mean_norms)))
            for k, success, norm in zip(active, successes, mean_norms):
                if searches[k].end_round(success, norm, args) or not reached[k]:
                    # the best successful mask; until one succeeds, the latest
                    best_masks[k], best_patterns[k] = current_masks[k], current_patterns[k]
                    reached[k] = reached[k] or success >= args.atk_succ_threshold
                if searches[k].stopped:
                    log.info(f"class {k}: {searches[k].stopped} after {searches[k].rounds} rounds, mask norm "
                             f"{float(best_masks[k].sum()):.2f}, cost {searches[k].cost:.3g}, "
                             f"{'reached' if reached[k] else 'never reached'} the success threshold")
            bar.update(1)
            bar.set_postfix(active=len(active))
    return ReversedTriggers(best_masks, best_patterns, searches, reached, images)


# ---------------------------------------------------------------- unlearning

def unlearning_set(data, triggers, flagged, ratio, generator):
    """The clean subset with a random `ratio` of its images stamped with the flagged classes' reversed triggers
    (in turn), every image keeping its true label."""
    images = data.images.cpu().numpy().copy()
    count = max(1, round(len(data) * ratio))
    chosen = torch.randperm(len(data), generator=generator)[:count]
    for turn, target in enumerate(flagged):
        share = chosen[turn::len(flagged)]
        images[share.numpy()] = stamp_pixels(data.images[share.to(data.device)], triggers.masks[target],
                                             triggers.patterns[target])
    return DeviceImages(images, data.labels.cpu().numpy(), data.device, data.mean.flatten().tolist(),
                        data.std.flatten().tolist()), count


# ---------------------------------------------------------------- outputs

def class_table(triggers, indices, flagged):
    return [{"class": k, "mask_norm": float(norm), "anomaly_index": float(index), "flagged": k in flagged,
             "reached_threshold": triggers.reached[k], "rounds": search.rounds, "stopped": search.stopped,
             "final_cost": search.cost}
            for k, (norm, index, search) in enumerate(zip(triggers.norms, indices, triggers.searches))]


# ---------------------------------------------------------------- the defense

def defend(run):
    setup, args = run.setup, run.args
    model, data, num_classes = setup.model, setup.clean_subset, setup.record.num_classes
    with run.phase("reverse_engineer"):
        started = time.perf_counter()
        triggers = reverse_engineer(model, data, num_classes, args, run.generator, run.logger, args.amp)
        seconds = time.perf_counter() - started
    run.count_images("reverse_engineer", triggers.images)
    norms = triggers.norms.tolist()
    indices = anomaly_index(torch.tensor(norms, dtype=torch.float64)).tolist()
    flagged = small_outliers(norms, args.anomaly_threshold)
    write_table(class_table(triggers, indices, flagged), run.path / "nc_classes.csv")
    save_trigger_grid(triggers, flagged, run.path / "reversed_triggers.png")
    triggers.save(run.path / "reversed_triggers.pt")
    run.logger.info(f"reverse engineering: {seconds:.1f} s, {triggers.images} stamped images; mask norms "
                    + ", ".join(f"{k}: {norm:.2f} (index {index:.2f})" for k, (norm, index)
                                in enumerate(zip(norms, indices))))
    run.summary.update(mask_norms=norms, anomaly_indices=indices, flagged_classes=flagged,
                       reverse_engineering_seconds=seconds, model_changed=bool(flagged))
    if not flagged:
        run.logger.info(f"no class has an anomaly index above {args.anomaly_threshold} below the median: "
                        "the model is returned unchanged")
        run.summary["outcome"] = "no class flagged: model unchanged"
        return model
    run.logger.info(f"flagged classes {flagged}: unlearning their reversed triggers")
    with run.phase("unlearn"):
        stamped, count = unlearning_set(data, triggers, flagged, args.unlearning_ratio, run.generator)
        run.summary.update(outcome=f"flagged {flagged}: unlearned", unlearning_images_stamped=count)
        run.add_epoch_table("nc_df", fine_tune(run, model, stamped, "unlearn"))
    return model


def main(argv=None):
    return run_defense(build_parser(), argv, DEFENSE, defend, check_args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
