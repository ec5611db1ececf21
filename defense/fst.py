"""FST: Feature Shift Tuning.

Min, Qin, Shen, Cheng. "Towards Stable Backdoor Purification through Feature Shift Tuning", NeurIPS 2023.
Re-initialise the classifier head at the original head's weight norm, fine-tune the whole model on the clean subset
with CE + alpha * <w_head, w_head_original>, and after every step project the head's weight back to that norm, so
that the features must shift away from the backdoored head's direction.

    python defense/fst.py --result_file badnet_0_1 --yaml_path config/defense/fst/cifar10.yaml --dataset cifar10
"""
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python defense/fst.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils.config import none_or_str, require_above, require_at_least, str2bool
from utils.defense_run import run_defense
from utils.defense_setup import defense_parser
from utils.errors import run_cli
from utils.models import classifier_head
from utils.precision import grad_scaler
from utils.training import train_epoch

DEFENSE = "fst"



def build_parser():
    parser = defense_parser("FST: re-initialise the head at its norm, tune away from the original head.")
    add = parser.add_argument
    add("--epochs", type=int, help="tuning epochs")
    add("--lr", type=float, help="SGD learning rate (cosine schedule per epoch)")
    add("--sgd_momentum", type=float, help="SGD momentum")
    add("--wd", type=float, help="weight decay (the authors' code uses none)")
    add("--alpha", type=float, help="weight of the inner product <w_head, w_head_original> in the loss")
    add("--linear_name", type=none_or_str, help="qualified name of the classifier head (default: found)")
    add("--reinit_bias", type=str2bool, help="also redraw the head's bias (the authors' code does)")
    return parser


def check_args(args):
    require_at_least(args, 0, "epochs")
    require_above(args, 0, "lr")
    require_at_least(args, 0, "alpha", why="a negative weight would pull the head back to the backdoored one")


def reinitialise_head(head, reinit_bias=True):
    """Redraw the head from U(-1/sqrt(in), 1/sqrt(in)) (the authors' draw), rescale its weight to the original
    weight's Frobenius norm; returns the original weight (detached float copy)."""
    original = head.weight.detach().float().clone()
    bound = 1.0 / math.sqrt(head.weight.shape[1])
    with torch.no_grad():
        head.weight.uniform_(-bound, bound)
        project_norm(head.weight, original.norm())
        if reinit_bias and head.bias is not None:
            head.bias.uniform_(-bound, bound)
    return original


def project_norm(weight, norm):
    """Scale `weight` in place so that its Frobenius norm is `norm`."""
    with torch.no_grad():
        weight.mul_(norm / weight.float().norm())


def shift_penalty(weight, original, alpha):
    """alpha * <w, w_original> (sum of the elementwise product); minimising it turns the head away from the
    original direction, the norm projection keeps it from just shrinking."""
    return alpha * (weight.float() * original).sum()


def tune(run, model, head, original):
    """Fine-tune everything with CE + shift penalty; project the head's weight norm back after each step."""
    setup, args = run.setup, run.args
    norm = original.norm()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.sgd_momentum, weight_decay=args.wd)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(args.epochs, 1))
    scaler = grad_scaler(setup.device, args.amp)

    def objective(logits, labels, _model):
        clean_loss = F.cross_entropy(logits, labels)
        return clean_loss + shift_penalty(head.weight, original, args.alpha), clean_loss

    rows = []
    epochs = tqdm(range(args.epochs), desc="fst", disable=not args.progress, leave=False)
    for epoch in epochs:
        stats = train_epoch(model, setup.clean_subset, optimizer, batch_size=args.batch_size,
                            augment=setup.augmentation, generator=run.generator, amp=args.amp, scaler=scaler,
                            objective=objective, after_step=lambda _x, _y: project_norm(head.weight, norm))
        scheduler.step()
        epochs.set_postfix(train_acc=f"{stats.acc:.3f}")
        run.end_epoch(rows, "finetune", epoch, stats, model, f"epoch {epoch}: clean-subset CE {stats.loss:.4f}, "
                      f"train acc {stats.acc:.4f}, cos(head, original head) {cosine(head.weight, original):.4f} "
                      f"({stats.seconds:.1f} s)")
    return rows


def cosine(weight, original):
    return float(F.cosine_similarity(weight.detach().float().flatten(), original.flatten(), dim=0))


def defend(run):
    setup, args = run.setup, run.args
    model = setup.model
    with run.phase("finetune"):
        name, head = classifier_head(model, setup.record.num_classes, args.linear_name)
        original = reinitialise_head(head, args.reinit_bias)
        run.logger.info(f"head {name}: re-initialised at the original weight norm {float(original.norm()):.4f}")
        run.add_epoch_table("fst_df", tune(run, model, head, original))
    run.summary.update(head=name, head_weight_norm=float(original.norm()),
                       head_cosine_to_original=cosine(head.weight, original))
    return model


def main(argv=None):
    return run_defense(build_parser(), argv, DEFENSE, defend, check_args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
