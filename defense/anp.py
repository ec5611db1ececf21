"""ANP: Adversarial Neuron Pruning.

Wu, Wang. "Adversarial Neuron Pruning Purifies Backdoored Deep Models", NeurIPS 2021.
Backdoor neurons are the ones whose small perturbation breaks the model. Learn a mask on every BatchNorm channel
that keeps the clean data right both as it is and under a worst-case multiplicative perturbation of the channels'
scale and shift (found by one sign-gradient ascent step); prune the channels whose mask falls low.

    python defense/anp.py --result_file badnet_0_1 --yaml_path config/defense/anp/cifar10.yaml --dataset cifar10
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python defense/anp.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from utils.config import require_above, require_at_least, require_in, str2bool
from utils.defense_run import run_defense
from utils.defense_setup import defense_parser
from utils.errors import run_cli
from utils.precision import autocast
from utils.pruning import (BatchNormMasks, add_pruning_options, batchnorm_layers,
                           check_pruning_args, prune_by_masks, split_for_rule)
from utils.tensor_data import augment_batch
from utils.training import EpochTally

DEFENSE = "anp"



def build_parser():
    parser = defense_parser("ANP: learn BatchNorm-channel masks robust to adversarial neuron perturbation, prune "
                            "the low-mask channels.")
    add = parser.add_argument
    add("--nb_iter", type=int, help="mask-optimisation iterations (batches drawn with replacement)")
    add("--print_every", type=int, help="iterations per row of mask_df.csv")
    add("--lr", type=float, help="mask learning rate")
    add("--sgd_momentum", type=float, help="momentum of the mask SGD")
    add("--anp_eps", type=float, help="perturbation budget (0: no perturbation, plain mask learning)")
    add("--anp_steps", type=int, help="sign-gradient ascent steps on the perturbation, each of anp_eps / anp_steps")
    add("--anp_alpha", type=float, help="loss = alpha * CE(natural) + (1 - alpha) * CE(perturbed)")
    add("--noise_clip", type=str2bool,
        help="keep the perturbation within [-anp_eps, anp_eps] after each ascent step (the reference code does "
             "not, so its random start plus one step reaches 2 anp_eps)")
    add_pruning_options(parser)
    return parser


def check_args(args):
    require_at_least(args, 1, "nb_iter", "print_every", "anp_steps")
    require_above(args, 0, "lr")
    require_at_least(args, 0, "anp_eps")
    require_in(args, "anp_alpha", "[0, 1]")
    check_pruning_args(args)


def sample_batch(data, batch_size, augment, generator):
    """A batch drawn with replacement from the clean data, augmented (the reference's RandomSampler)."""
    index = torch.randint(len(data), (batch_size,), generator=generator).to(data.device)
    return data.normalise(augment_batch(data.images[index], augment, generator)), data.labels[index]


def perturb(model, masks, x, y, args, generator):
    """The perturbation that most raises this batch's loss: a uniform start in [-eps, eps], then anp_steps
    sign-gradient ascent steps of eps / anp_steps (projected back into [-eps, eps] with noise_clip)."""
    eps, device = args.anp_eps, x.device
    noises = masks.noise_parameters()
    with torch.no_grad():
        for noise in noises:
            noise.copy_((torch.rand(noise.shape, generator=generator) * 2 - 1).to(device) * eps)
    masks.perturbed = True
    for _ in range(args.anp_steps):
        with autocast(device, args.amp, unscaled=True):
            loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, noises)
        with torch.no_grad():
            for noise, grad in zip(noises, grads):
                noise.add_(grad.sign(), alpha=eps / args.anp_steps)
                if args.noise_clip:
                    noise.clamp_(-eps, eps)


def optimise_masks(run, model, masks, data):
    """nb_iter steps of mask SGD on alpha * CE(natural) + (1 - alpha) * CE(perturbed), masks clipped to [0, 1];
    one table row per print_every iterations."""
    args, device = run.args, run.device
    model.train()  # BatchNorm on batch statistics, as the reference
    model.requires_grad_(False)  # only the masks (and the perturbation) get gradients
    optimizer = torch.optim.SGD(masks.parameters(), lr=args.lr, momentum=args.sgd_momentum)
    robust = args.anp_eps > 0
    passes = 1 + args.anp_steps + 1 if robust else 1  # forward passes per sample: perturbation, robust, natural
    rows, tally = [], EpochTally()
    for iteration in range(args.nb_iter):
        x, y = sample_batch(data, args.batch_size, run.setup.augmentation, run.generator)
        loss_robust = 0.0
        if robust:
            perturb(model, masks, x, y, args, run.generator)
            with autocast(device, args.amp, unscaled=True):
                loss_robust = F.cross_entropy(model(x), y)
        masks.perturbed = False
        with autocast(device, args.amp, unscaled=True):
            logits = model(x)
            loss = args.anp_alpha * F.cross_entropy(logits, y) + (1 - args.anp_alpha) * loss_robust
        for mask, grad in zip(masks.parameters(), torch.autograd.grad(loss, masks.parameters())):
            mask.grad = grad
        optimizer.step()
        masks.clip_()
        tally.add(loss, logits, y)
        if (iteration + 1) % args.print_every == 0 or iteration + 1 == args.nb_iter:
            stats = tally.stats()
            run.end_epoch(rows, "mask", len(rows), stats, model, f"mask iterations {iteration + 1 - stats.batches}-"
                          f"{iteration + 1}: loss {stats.loss:.4f}, natural train acc {stats.acc:.4f} "
                          f"({stats.seconds:.1f} s)", images=stats.samples * passes)
            tally = EpochTally()
    return rows


def defend(run):
    setup = run.setup
    model = setup.model  # masked in place; the pruned model is a fresh copy of the original
    batchnorm_layers(model, "ANP")  # a model without BatchNorm fails here, before any work
    data, holdout = split_for_rule(setup.clean_subset, run.args, run.generator)
    with run.phase("mask"), BatchNormMasks(model, "ANP", noise=True) as masks:
        run.add_epoch_table("mask_df", optimise_masks(run, model, masks, data))
        values = masks.values()
    run.summary.update(mask_iterations=run.args.nb_iter, mask_samples=len(data))

    return prune_by_masks(run, values, holdout)


def main(argv=None):
    return run_defense(build_parser(), argv, DEFENSE, defend, check_args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
