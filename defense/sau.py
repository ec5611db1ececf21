"""SAU: shared adversarial unlearning.

Wei, Zhang, Zha, Wu. "Shared Adversarial Unlearning: Backdoor Mitigation by Unlearning Shared Adversarial
Examples", NeurIPS 2023.
Adversarial examples that fool both the backdoored model and the model being purified into the same label are the
ones that may act like the trigger. Each batch of the clean subset: PGD (L-inf, in [0, 1] pixel space) finds such
shared adversarial examples against a frozen copy of the backdoored model and the current model; the current model
then takes an Adam step on lmd_1 * CE(clean) + lmd_2 * CE(adversarial) + lmd_3 * (shared adversarial loss: push
the current model away from the label the backdoored model gives the adversarial example).

    python defense/sau.py --result_file badnet_0_1 --yaml_path config/defense/sau/cifar10.yaml --dataset cifar10
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python defense/sau.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils.config import require_above, require_at_least, str2bool
from utils.defense_run import run_defense
from utils.defense_setup import defense_parser
from utils.errors import run_cli
from utils.precision import autocast
from utils.training import EpochTally

DEFENSE = "sau"
PGD_INITS = ("max", "min", "zero", "random")


def build_parser():
    parser = defense_parser("SAU: unlearn shared adversarial examples of the backdoored and the purified model.")
    add = parser.add_argument
    add("--n_rounds", type=int, help="epochs over the clean subset (one PGD attack and one Adam step per batch)")
    add("--lr", type=float, help="Adam learning rate (constant)")
    add("--trigger_norm", type=float, help="L-inf bound of the perturbation in [0, 1] pixel space")
    add("--adv_lr", type=float, help="PGD step size (sign of the gradient) in [0, 1] pixel space")
    add("--adv_steps", type=int, help="PGD steps (fewer when every example of the batch is already shared)")
    add("--pgd_init", type=str, choices=PGD_INITS,
        help="PGD start: every pixel at +trigger_norm (max), -trigger_norm (min), 0, or uniform in the ball")
    add("--beta_1", type=float, help="PGD: weight of the adversarial loss (CE of the examples not yet fooling)")
    add("--beta_2", type=float, help="PGD: weight of the shared loss (JS divergence of the two models' outputs)")
    add("--lmd_1", type=float, help="unlearning: weight of CE on the clean batch")
    add("--lmd_2", type=float, help="unlearning: weight of CE on the adversarial batch (adversarial training)")
    add("--lmd_3", type=float, help="unlearning: weight of the shared adversarial loss")
    add("--train_mode", type=str2bool,
        help="BatchNorm in train mode for the unlearning forward pass (false: running statistics, higher ACC)")
    return parser


def check_args(args):
    require_at_least(args, 0, "n_rounds", "adv_steps")
    require_above(args, 0, "lr")
    require_at_least(args, 0, "trigger_norm", "adv_lr", "beta_1", "beta_2", "lmd_1", "lmd_2", "lmd_3")


def initial_perturbation(shape, bound, init, generator, device):
    """The PGD start in pixel space, within [-bound, bound]."""
    if init == "random":
        return ((torch.rand(shape, generator=generator) * 2 - 1) * bound).to(device)
    value = {"max": bound, "min": -bound, "zero": 0.0}[init]
    return torch.full(shape, value, device=device)


def js_divergence(logits, other_logits):
    """Per-sample Jensen-Shannon divergence of the two softmax outputs (probabilities clamped at 1e-8)."""
    p = F.softmax(logits.float(), dim=1).clamp(min=1e-8)
    q = F.softmax(other_logits.float(), dim=1).clamp(min=1e-8)
    m = 0.5 * (p + q)
    return 0.5 * (p * (p.log() - m.log()) + q * (q.log() - m.log())).sum(dim=1)


def shared_adversarial_perturbation(model, reference, x, y, clean_ref, std, args, generator):
    """PGD in pixel space: minimise beta_1 * L_adv + beta_2 * L_share over delta, |delta| <= trigger_norm, where
    L_adv = -(CE of the examples that do not yet fool the model + the same for the reference) / (2 N) and
    L_share = sum of JS(model, reference) over the examples not yet shared / N. An example fools a model when its
    prediction differs from the model's prediction of the clean image; it is shared when it fools both into the
    same label. x is normalised, std the normalisation's std: x + delta / std is (pixels + delta) normalised;
    clean_ref holds the reference's predictions of x."""
    bound = args.trigger_norm
    delta = initial_perturbation(x.shape, bound, args.pgd_init, generator, x.device)
    with torch.no_grad(), autocast(x.device, args.amp, unscaled=True):
        own = model(x).argmax(1)
    for _ in range(args.adv_steps):
        delta.requires_grad_(True)
        with autocast(x.device, args.amp, unscaled=True):
            logits, logits_ref = model(x + delta / std), reference(x + delta / std)
        label, label_ref = logits.argmax(1), logits_ref.argmax(1)
        fooled, fooled_ref = label != own, label_ref != clean_ref
        shared = fooled & fooled_ref & (label == label_ref)
        loss_adv = -(F.cross_entropy(logits.float(), y, reduction="none")[~fooled].sum()
                     + F.cross_entropy(logits_ref.float(), y, reduction="none")[~fooled_ref].sum()) / (2 * len(y))
        loss_share = js_divergence(logits, logits_ref)[~shared].sum() / len(y)
        grad, = torch.autograd.grad(args.beta_1 * loss_adv + args.beta_2 * loss_share, delta)
        delta = (delta - args.adv_lr * grad.sign()).clamp(-bound, bound).detach()
        if shared.all():  # every example was shared before this step (the reference code's early stop)
            break
    return delta.detach()


def shared_adversarial_loss(adv_logits, adv_label_ref, mask):
    """-log(1 - p(adv_label_ref)) of the current model's adversarial outputs, summed over `mask` and divided by
    the batch size: the current model must not give an adversarial example the label the backdoored model gives
    it. As the reference, half of it reads 1 - p as the sum of the other classes' probabilities, clamped at
    0.999, the other half as 1 - p with p clamped at 0.001 (equal in exact arithmetic, kinder numerically)."""
    if not mask.any():
        return adv_logits.sum() * 0.0
    probabilities = F.softmax(adv_logits.float(), dim=1)
    target = F.one_hot(adv_label_ref, probabilities.shape[1]).bool()
    positive = probabilities[target][mask]
    negative = probabilities.masked_fill(target, 0.0).sum(dim=1)[mask]
    total = -torch.log(1e-6 + negative.clamp(max=0.999)).sum() - torch.log(1 + 1e-6 - positive.clamp(min=0.001)).sum()
    return total / 2 / len(adv_logits)


def unlearning_losses(model, reference, x, y, delta, clean_ref, std, train_mode=False, amp=False):
    """The three terms of the unlearning objective, the clean logits and the share of the batch that fools the
    backdoored model (the reference): predicted neither as the label nor as its clean prediction clean_ref; the
    shared adversarial loss counts those examples."""
    adversarial = x + delta / std
    model.train(train_mode)
    with autocast(x.device, amp, unscaled=True):
        logits, adv_logits = model(torch.cat([x, adversarial])).split(len(y))
    model.eval()
    with torch.no_grad(), autocast(x.device, amp, unscaled=True):
        adv_label_ref = reference(adversarial).argmax(1)
    fooled_ref = (adv_label_ref != y) & (adv_label_ref != clean_ref)
    terms = {"clean": F.cross_entropy(logits.float(), y), "adversarial": F.cross_entropy(adv_logits.float(), y),
             "shared": shared_adversarial_loss(adv_logits, adv_label_ref, fooled_ref)}
    return terms, logits.detach(), float(fooled_ref.float().mean())


def unlearning_objective(terms, args):
    """lmd_1 * CE(clean) + lmd_2 * CE(adversarial) + lmd_3 * shared adversarial loss."""
    return args.lmd_1 * terms["clean"] + args.lmd_2 * terms["adversarial"] + args.lmd_3 * terms["shared"]


def unlearn_epoch(run, model, reference, optimizer):
    """One pass over the shuffled clean subset (no augmentation, as the reference): attack, then one Adam step."""
    data, args = run.setup.clean_subset, run.args
    sums, tally = {"clean": 0.0, "adversarial": 0.0, "shared": 0.0, "fooled_ref": 0.0}, EpochTally()
    for x, y in data.batches(args.batch_size, shuffle=True, generator=run.generator):
        with torch.no_grad(), autocast(x.device, args.amp, unscaled=True):
            clean_ref = reference(x).argmax(1)  # the frozen model's clean predictions, used by both steps
        delta = shared_adversarial_perturbation(model, reference, x, y, clean_ref, data.std, args, run.generator)
        terms, logits, fooled_ref = unlearning_losses(model, reference, x, y, delta, clean_ref, data.std,
                                                      args.train_mode, args.amp)
        loss = unlearning_objective(terms, args)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for key, value in terms.items():
            sums[key] += value.item()
        sums["fooled_ref"] += fooled_ref
        tally.add(loss, logits, y)
    stats = tally.stats()
    return stats, {key: value / max(stats.batches, 1) for key, value in sums.items()}


def defend(run):
    setup, args = run.setup, run.args
    model = setup.model.eval()  # BatchNorm on running statistics (unless --train_mode), as the reference
    reference = setup.fresh_backdoored_model().eval().requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    rows = []
    with run.phase("unlearn"):
        for epoch in tqdm(range(args.n_rounds), desc="sau", disable=not args.progress, leave=False):
            stats, means = unlearn_epoch(run, model, reference, optimizer)
            run.end_epoch(rows, "unlearn", epoch, stats, model, f"epoch {epoch + 1}/{args.n_rounds}: loss "
                          f"{stats.loss:.4f} (clean CE {means['clean']:.4f}, adversarial CE "
                          f"{means['adversarial']:.4f}, shared {means['shared']:.4f}), backdoored model fooled on "
                          f"{means['fooled_ref']:.4f} of the examples, clean train acc {stats.acc:.4f} "
                          f"({stats.seconds:.1f} s)")
    run.add_epoch_table("sau_df", rows)
    return model


def main(argv=None):
    return run_defense(build_parser(), argv, DEFENSE, defend, check_args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
