"""i-BAU: implicit backdoor adversarial unlearning.

Zeng, Chen, Park, Mao, Jin, Jia. "Adversarial Unlearning of Backdoors via Implicit Hypergradient", ICLR 2022.
A min-max problem on the clean subset: the inner maximisation finds one universal perturbation delta that most
raises the model's loss; the outer minimisation fine-tunes the model so that delta stops working. The outer
gradient counts how delta* moves with the weights (the implicit hypergradient), with the inverse-Hessian-vector
product approximated by K fixed-point iterations of the inner problem's gradient-descent map.

    python defense/ibau.py --result_file badnet_0_1 --yaml_path config/defense/ibau/cifar10.yaml --dataset cifar10
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python defense/ibau.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils.config import require_above, require_at_least, require_in
from utils.defense_run import run_defense
from utils.defense_setup import defense_parser
from utils.errors import run_cli
from utils.precision import autocast
from utils.training import EpochTally

DEFENSE = "ibau"


def build_parser():
    parser = defense_parser("i-BAU: unlearn a universal adversarial perturbation of the clean subset, with the "
                            "implicit hypergradient.")
    add = parser.add_argument
    add("--n_rounds", type=int, help="outer rounds: a new universal perturbation, then one unlearning pass")
    add("--K", type=int, help="fixed-point iterations approximating the inverse-Hessian-vector product")
    add("--lr", type=float, help="Adam learning rate of the outer (unlearning) steps")
    add("--pert_lr", type=float, help="SGD step size of the universal perturbation (one step per clean batch)")
    add("--pert_reg", type=float, help="weight of ||delta||^2 in the inner objective -CE + pert_reg * ||delta||^2")
    add("--pert_norm_bound", type=float,
        help="project the perturbation onto the L2 ball of this radius in normalised-input space (0: unbounded)")
    add("--fixed_point_lr", type=float,
        help="step size of the inner gradient-descent map whose fixed point the hypergradient differentiates")
    add("--outer_portion", type=float,
        help="share of each unlearning batch that carries the perturbation (the authors' code: 0.01)")
    return parser


def check_args(args):
    require_at_least(args, 0, "n_rounds", "pert_reg", "pert_norm_bound")
    require_at_least(args, 1, "K")
    require_above(args, 0, "lr", "pert_lr", "fixed_point_lr")
    require_in(args, "outer_portion", "[0, 1]")


def project_l2(delta, bound):
    """delta scaled into the L2 ball of radius `bound` (0: unbounded)."""
    if bound <= 0:
        return delta
    return delta * min(1.0, bound / max(float(delta.norm()), 1e-12))


def inner_objective(model, x, labels, delta, pert_reg, amp=False):
    """The inner problem, minimised over delta: -CE(model(x + delta), labels) + pert_reg * ||delta||^2."""
    with autocast(x.device, amp, unscaled=True):
        loss = -F.cross_entropy(model(x + delta), labels)
    return loss.float() + pert_reg * delta.pow(2).sum()


def universal_perturbation(model, batches, args):
    """The inner maximisation: delta (one image's shape) from 0, one SGD step of pert_lr per clean batch on the
    inner objective against the model's own predictions, then projected onto the L2 ball.
    Returns (delta, its norm before the projection)."""
    delta = None
    for x, _ in batches:
        if delta is None:
            delta = torch.zeros_like(x[:1])
        with torch.no_grad():
            own = model(x).argmax(1)
        delta.requires_grad_(True)
        grad, = torch.autograd.grad(inner_objective(model, x, own, delta, args.pert_reg, args.amp), delta)
        delta = (delta - args.pert_lr * grad).detach()
    norm = float(delta.norm())
    return project_l2(delta, args.pert_norm_bound), norm


def hypergradient(outer_loss, inner_loss, delta, params, K, fixed_point_lr):
    """d outer_loss / d params with delta = delta*(params), the inner solution.

    delta* is a fixed point of the gradient-descent map phi(delta) = delta - fixed_point_lr * d inner / d delta,
    so (implicit function theorem) d delta*/d params = (I - J)^-1 d phi/d params with J = d phi/d delta. The
    vector v = (I - J^T)^-1 d outer/d delta comes from K fixed-point steps v <- J^T v + d outer/d delta started
    at v = 0 (a Neumann series cut after K terms); the result is d outer/d params + (d phi/d params)^T v.
    """
    delta = delta.detach().requires_grad_(True)
    outer_delta, *outer_params = torch.autograd.grad(outer_loss(delta), [delta, *params], allow_unused=True)
    inner_grad, = torch.autograd.grad(inner_loss(delta), delta, create_graph=True)
    mapped = delta - fixed_point_lr * inner_grad
    v = outer_delta  # the first step from v = 0
    for _ in range(K - 1):
        v = torch.autograd.grad(mapped, delta, grad_outputs=v, retain_graph=True)[0] + outer_delta
    implicit = torch.autograd.grad(mapped, params, grad_outputs=v, allow_unused=True)
    return [_or_zeros(direct, p) + _or_zeros(indirect, p)
            for p, direct, indirect in zip(params, outer_params, implicit)]


def _or_zeros(grad, like):
    """A parameter that a loss does not use gets a zero gradient from it."""
    return torch.zeros_like(like) if grad is None else grad


def patch_mask(count, portion, generator, device):
    """1 for the int(count * portion) samples of a batch that carry the perturbation, 0 for the others."""
    mask = torch.zeros(count, 1, 1, 1, device=device)
    mask[torch.randperm(count, generator=generator)[:int(count * portion)].to(device)] = 1.0
    return mask


def unlearn(model, optimizer, batches, delta, args, generator):
    """One outer pass: per batch an Adam step on the hypergradient of CE(model(x + mask * delta), y), where the
    inner problem is the one that found delta, on the first batch with its true labels (the authors' choice)."""
    params = [p for p in model.parameters() if p.requires_grad]
    inner_x, inner_y = batches[0]

    def inner_loss(d):
        return inner_objective(model, inner_x, inner_y, d, args.pert_reg, args.amp)

    tally = EpochTally()
    for x, y in batches:
        mask = patch_mask(len(y), args.outer_portion, generator, x.device)
        last = {}  # the outer pass's logits and loss, for the epoch statistics

        def outer_loss(d):
            with autocast(x.device, args.amp, unscaled=True):
                logits = model(x + mask * d)
            loss = F.cross_entropy(logits.float(), y)
            last["logits"], last["loss"] = logits.detach(), loss.detach()
            return loss

        grads = hypergradient(outer_loss, inner_loss, delta, params, args.K, args.fixed_point_lr)
        optimizer.zero_grad(set_to_none=True)
        for p, g in zip(params, grads):
            p.grad = g.to(p.dtype)
        optimizer.step()
        tally.add(last["loss"], last["logits"], y)
    return tally.stats()


@torch.no_grad()
def fooling_rate(model, batches, delta):
    """Share of the clean batches whose prediction delta changes."""
    changed = sum(int((model(x).argmax(1) != model(x + delta).argmax(1)).sum()) for x, _ in batches)
    return changed / max(sum(len(y) for _, y in batches), 1)


def augmented_batches(run):
    """One shuffled pass over the clean subset with the training augmentation (BackdoorBench's loader)."""
    return run.setup.clean_subset.batches(run.args.batch_size, shuffle=True, augment=run.setup.augmentation,
                                          generator=run.generator)


def defend(run):
    args, model, data = run.args, run.setup.model, run.setup.clean_subset
    model.eval()  # BatchNorm on running statistics throughout, as the authors' and BackdoorBench's code
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    rows, norms, rates = [], [], []
    with run.phase("unlearn"):
        batches = list(augmented_batches(run))  # drawn once and reused every round, as the reference code
        for round_ in tqdm(range(args.n_rounds), desc="i-bau", disable=not args.progress, leave=False):
            delta, raw_norm = universal_perturbation(model, augmented_batches(run), args)
            fooled_before = fooling_rate(model, batches, delta)
            stats = unlearn(model, optimizer, batches, delta, args, run.generator)
            fooled_after = fooling_rate(model, batches, delta)
            norms.append(float(delta.norm()))
            rates.append(fooled_after)
            run.end_epoch(rows, "unlearn", round_, stats, model, f"round {round_ + 1}/{args.n_rounds}: perturbation "
                          f"L2 {raw_norm:.3f} (projected {norms[-1]:.3f}), fools {fooled_before:.4f} of the clean "
                          f"subset before unlearning, {fooled_after:.4f} after; outer CE {stats.loss:.4f}, train acc "
                          f"{stats.acc:.4f} ({stats.seconds:.1f} s)",
                          images=len(data) + stats.samples)  # perturbation pass + unlearning pass
    run.add_epoch_table("ibau_df", rows)
    run.summary.update(perturbation_l2=norms, fooling_rate_after_round=rates)
    return model


def main(argv=None):
    return run_defense(build_parser(), argv, DEFENSE, defend, check_args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
