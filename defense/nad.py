"""NAD: Neural Attention Distillation.

Li, Lyu, Koren, Lyu, Li, Ma. "Neural Attention Distillation: Erasing Backdoor Triggers from Deep Neural Networks",
ICLR 2021.
Fine-tune a copy of the backdoored model on the clean subset (the teacher), then train the backdoored model (the
student) on the same data with cross-entropy plus, at the outputs of its deepest stages, the distance between its
attention maps and the teacher's: attention = mean over channels of |activation|^p, flattened and L2-normalised;
distance = mean squared difference, weighted per stage by beta. The teacher has forgotten part of the backdoor;
matching its attention pulls the student's deep features to where clean data put them.

    python defense/nad.py --result_file badnet_0_1 --yaml_path config/defense/nad/cifar10.yaml --dataset cifar10
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python defense/nad.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils.config import require, require_above, require_at_least
from utils.defense_run import run_defense
from utils.defense_setup import defense_parser
from utils.errors import UserError, run_cli
from utils.precision import autocast, grad_scaler
from utils.training import TrainingRecipe, eval_mode, fine_tune, train_epoch

DEFENSE = "nad"
AUTO = ["auto"]


def build_parser():
    parser = defense_parser("NAD: fine-tune a teacher copy, then train the backdoored model to match its attention "
                            "maps at the deepest stages.")
    add = parser.add_argument
    add("--te_epochs", type=int, help="epochs of fine-tuning the teacher (a copy of the backdoored model)")
    add("--epochs", type=int, help="epochs of training the backdoored model with CE + attention distillation")
    add("--lr", type=float, help="SGD learning rate of both phases")
    add("--sgd_momentum", type=float, help="SGD momentum of both phases")
    add("--wd", type=float, help="weight decay of both phases")
    add("--lr_scheduler", type=str, choices=["CosineAnnealingLR", "none"],
        help="schedule of both phases (cosine: stepped once per epoch over the phase's epochs)")
    add("--layer_names", type=str, nargs="+",
        help="qualified names of the modules whose outputs are distilled, shallow to deep (auto: the outputs at the "
             "deepest feature-map resolutions, as many as --betas)")
    add("--betas", type=float, nargs="+", help="weight of each layer's attention distance, in --layer_names order")
    add("--p", type=float, help="attention map = mean over channels of |activation|^p")
    return parser


def check_args(args):
    require_at_least(args, 0, "epochs", "te_epochs")
    require_above(args, 0, "lr", "p")
    require(all(beta >= 0 for beta in args.betas), f"--betas must be >= 0, got {' '.join(map(str, args.betas))}")
    require(args.layer_names == AUTO or len(args.layer_names) == len(args.betas), f"--layer_names names "
            f"{len(args.layer_names)} layers but --betas gives {len(args.betas)} weights: one beta per layer")


def attention_map(features, p):
    """(N, C, H, W) -> (N, H*W): mean over channels of |features|^p, flattened, L2-normalised per sample."""
    return F.normalize(features.float().abs().pow(p).mean(dim=1).flatten(1), dim=1)


def attention_distance(student, teacher, p):
    """Mean squared difference of the two attention maps (NAD's and BackdoorBench's F.mse_loss; the betas are
    calibrated to this mean over samples and positions)."""
    return F.mse_loss(attention_map(student, p), attention_map(teacher, p))


class LayerOutputs:
    """The latest output of each named module, kept by forward hooks ({name: tensor}); remove() takes them off."""

    def __init__(self, model, names):
        modules = dict(model.named_modules())
        self.outputs = {}
        self._handles = [modules[name].register_forward_hook(self._keep(name)) for name in names]

    def _keep(self, name):
        def hook(_module, _inputs, output):
            self.outputs[name] = output
        return hook

    def remove(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []


@torch.no_grad()
def deepest_stages(model, x, count):
    """Names of the modules whose outputs are the feature maps at the `count` smallest resolutions above 1x1, shallow
    to deep: at each resolution, the outermost module producing the tensor that a later module downsamples
    (PreAct-ResNet18: layer2 layer3 layer4). Found by one eval-mode forward pass of the batch `x`."""
    producer, alive, stage_at = {}, [], {}

    def hook(name):
        def record(_module, inputs, output):
            given = inputs[0] if inputs and torch.is_tensor(inputs[0]) else None
            if given is not None and given.dim() == 4 and torch.is_tensor(output) and output.dim() == 4:
                if output.shape[-2:].numel() < given.shape[-2:].numel() and id(given) in producer:
                    stage_at[given.shape[-2:].numel()] = producer[id(given)]  # outer consumers come later
            if torch.is_tensor(output):
                producer[id(output)] = name  # an enclosing module returning the same tensor comes later
                alive.append(output)  # no id is reused during the pass
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in model.named_modules() if name]
    with eval_mode(model, handles):
        model(x)
    resolutions = sorted((area for area in stage_at if area > 1), reverse=True)
    return [stage_at[area] for area in resolutions[-count:]] if len(resolutions) >= count else None


@torch.no_grad()
def stage_modules(model, names, x, count):
    """The distilled layers' names: `names`, or with auto the deepest stages; one UserError for a name this model
    lacks or a layer that does not output a feature map (N, C, H, W)."""
    found = deepest_stages(model, x, count)
    if names == AUTO:
        if found is None:
            raise UserError(f"NAD: --layer_names auto found fewer than {count} feature-map resolutions in this model "
                            f"({type(model).__name__}); name the layers with --layer_names")
        return found
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules or not name]
    if missing:
        hint = f"; its deepest stages here: {' '.join(found)} (or pass auto)" if found else ""
        raise UserError(f"NAD: no module named {missing[0]!r} in this model ({type(model).__name__}); --layer_names "
                        f"takes qualified module names{hint}")
    outputs = LayerOutputs(model, names)
    try:
        with eval_mode(model):
            model(x)
    finally:
        outputs.remove()
    for name in names:
        output = outputs.outputs.get(name)
        if not torch.is_tensor(output) or output.dim() != 4:
            raise UserError(f"NAD: layer {name} does not output a feature map (N, C, H, W) in this model "
                            f"({'never called' if output is None else tuple(getattr(output, 'shape', ()))})")
    return list(names)


def distil(run, student, teacher, names):
    """--epochs of SGD on CE + sum of beta * attention distance to the teacher at each named layer."""
    setup, args = run.setup, run.args
    recipe = TrainingRecipe.from_options({**vars(args), "progress": False})
    optimizer = torch.optim.SGD(student.parameters(), lr=args.lr, momentum=args.sgd_momentum, weight_decay=args.wd)
    steps_per_epoch = -(-len(setup.clean_subset) // args.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: recipe.lr_factor(step, steps_per_epoch))
    student_out, teacher_out = LayerOutputs(student, names), LayerOutputs(teacher, names)
    teacher.eval()
    parts = {}

    def teacher_pass(x, y):
        # the teacher sees the same augmented batch just before the student's forward pass
        with torch.no_grad(), autocast(setup.device, args.amp):
            teacher(x)
        return x, y

    def objective(logits, labels, _model):
        ce = F.cross_entropy(logits, labels)
        distance = sum(beta * attention_distance(student_out.outputs[name], teacher_out.outputs[name], args.p)
                       for name, beta in zip(names, args.betas))
        parts["ce"] = parts.get("ce", 0.0) + float(ce.detach())
        parts["attention"] = parts.get("attention", 0.0) + float(distance.detach())
        return ce + distance, ce + distance

    scaler = grad_scaler(setup.device, args.amp)
    rows = []
    try:
        for epoch in tqdm(range(args.epochs), desc="nad", disable=not args.progress, leave=False):
            parts.clear()
            stats = train_epoch(student, setup.clean_subset, optimizer, batch_size=args.batch_size,
                                augment=setup.augmentation, generator=run.generator, amp=args.amp,
                                scaler=scaler, objective=objective,
                                after_step=lambda _x, _y: schedule.step(), batch_transform=teacher_pass)
            run.end_epoch(rows, "distil", epoch, stats, student, f"epoch {epoch + 1}/{args.epochs}: loss "
                          f"{stats.loss:.4f} (CE {parts['ce'] / stats.batches:.4f}, attention "
                          f"{parts['attention'] / stats.batches:.4f}), train_acc {stats.acc:.4f} "
                          f"({stats.seconds:.1f} s)")
    finally:
        student_out.remove()
        teacher_out.remove()
    return rows


def defend(run):
    setup, args = run.setup, run.args
    student = setup.model
    first = next(setup.clean_subset.batches(min(len(setup.clean_subset), 32)))[0]
    names = stage_modules(student, args.layer_names, first, len(args.betas))  # a missing layer fails here
    run.logger.info(f"distilled layers: {', '.join(f'{n} (beta {b:g})' for n, b in zip(names, args.betas))}")
    with run.phase("teacher"):
        teacher = setup.fresh_backdoored_model()
        # the teacher: FT's training run on the clean subset for --te_epochs
        run.add_epoch_table("nad_teacher_df", fine_tune(run, teacher, setup.clean_subset, "teacher",
                                                        epochs=args.te_epochs))
    with run.phase("distil"):
        run.add_epoch_table("nad_df", distil(run, student, teacher, names))
    run.summary.update(nad={"layers": names, "betas": list(args.betas), "p": args.p, "te_epochs": args.te_epochs,
                            "epochs": args.epochs})
    return student


def main(argv=None):
    return run_defense(build_parser(), argv, DEFENSE, defend, check_args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
