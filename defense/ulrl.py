"""ULRL: UnLearn and ReLearn.

Min, Pham, Sun. "Unified Neural Backdoor Removal with Only Few Clean Samples through Unlearning and Relearning",
arXiv 2405.14781 (IEEE T-IFS). Unlearn the clean subset by gradient ascent, find the neurons whose weights moved
most (median-absolute-deviation outliers), re-initialise them in the original backdoored model and relearn the clean
subset with a cosine penalty that pushes them away from their backdoored direction.

    python defense/ulrl.py --result_file badnet_0_1 --yaml_path config/defense/ulrl/cifar10.yaml --dataset cifar10
"""
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python defense/ulrl.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from utils.config import none_or_str, require, require_at_least, require_in, str2bool
from utils.defense_run import run_defense
from utils.defense_setup import defense_parser
from utils.errors import UserError, run_cli
from utils.models import classifier_head
from utils.outliers import anomaly_index
from utils.reporting import write_table
from utils.precision import autocast, grad_scaler
from utils.selection import largest_within_tolerance
from utils.training import accuracy, eval_mode, predict, train_epoch
from utils.unlearning import UnlearningRule, neuron_weight_change, unlearn as unlearn_until_forgotten

DEFENSE = "ulrl"



def build_parser():
    parser = defense_parser("ULRL: unlearn, find the neurons that moved most, re-initialise them, relearn.")
    add = parser.add_argument
    add("--unlearning_epochs", type=int, help="at most this many unlearning epochs")
    add("--unlearning_lr", type=float, help="unlearning SGD learning rate")
    add("--lr_scheduler", type=str, choices=["MultiStepLR", "CosineAnnealingLR", "none"],
        help="unlearning schedule, stepped per epoch")
    add("--steplr_milestones", type=int, nargs="+", help="MultiStepLR milestones (epochs)")
    add("--steplr_gamma", type=float, help="MultiStepLR factor at each milestone")
    add("--clean_threshold", type=float, help="stop unlearning once the epoch's training accuracy is <= this")
    add("--client_optimizer", type=str, choices=["sgd"], help="unlearning optimizer (the reference uses SGD)")
    add("--sgd_momentum", type=float, help="SGD momentum (unlearning and relearning)")
    add("--wd", type=float, help="unlearning weight decay")
    add("--unlearning_grad_clip", type=float, help="clip the total gradient norm while unlearning")
    add("--init", type=str2bool, help="re-initialise the selected neurons (false: keep them, only the penalty)")
    add("--relearn_epochs", type=int, help="relearning epochs (cosine schedule)")
    add("--relearn_lr", type=float, help="relearning SGD learning rate")
    add("--relearn_alpha", type=float, help="weight of the cosine-similarity penalty")
    add("--linear_name", type=none_or_str, help="qualified name of the classifier head (default: found)")
    add("--selection", type=str, choices=["first", "top"],
        help="which outliers to keep under the cap: lowest index first (reference) or largest z first")
    add("--max_neurons", type=int, help="keep at most this many neurons per layer (0: no cap)")
    add("--mad_threshold", type=float, help="outlier if the modified z-score exceeds this")
    add("--scope", type=str, choices=["head", "all"],
        help="score the head's rows (reference) or the output channels of every conv/linear layer")
    add("--extra_bn_update", type=str2bool,
        help="after each relearning step, one more train-mode forward pass (the reference's BatchNorm update)")
    add("--prune_shares", type=float, nargs="*",
        help="feature pruning (not in the reference): candidate shares of all conv channels to prune, ranked by "
             "their contribution to the unlearned model's target logit on the clean subset; none: no pruning")
    add("--prune_tolerance", type=float,
        help="feature pruning: the largest share whose clean-subset accuracy stays within this of the backdoored "
             "model's is pruned")
    return parser


def select_outliers(scores, threshold=3.5, max_neurons=2, selection="first"):
    """Neurons whose weight-change score is a high outlier by the median-absolute-deviation test.

    z = |s - median| / (1.4826 MAD) (utils/outliers.py); outliers have z > threshold and s > median. `first` keeps
    them in ascending index order (the reference), `top` by decreasing z; at most `max_neurons` are kept (0: all).
    Returns (selected indices, z).
    """
    scores = torch.as_tensor(scores)
    median = torch.median(scores)
    z = anomaly_index(scores)
    outliers = [i for i in range(len(scores)) if bool(z[i] > threshold) and bool(scores[i] > median)]
    if selection == "top":
        outliers.sort(key=lambda i: -float(z[i]))
    if max_neurons > 0:
        outliers = outliers[:max_neurons]
    return outliers, z


def scored_layers(model, args, num_classes):
    """{qualified name: module} of the layers whose output neurons are scored."""
    if args.scope == "head":
        name, head = classifier_head(model, num_classes, args.linear_name)
        return {name: head}
    layers = {name: module for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))}
    if not layers:
        raise UserError("--scope all: this model has no Conv2d or Linear layer to score")
    return layers


def unlearn(run):
    """Gradient ascent on the clean subset until the epoch's running training accuracy <= clean_threshold."""
    args, model = run.args, run.setup.model
    optimizer = torch.optim.SGD(model.parameters(), lr=args.unlearning_lr, momentum=args.sgd_momentum,
                                weight_decay=args.wd)
    rule = UnlearningRule(optimizer, args.clean_threshold, args.unlearning_epochs,
                          scheduler=make_scheduler(optimizer, args), grad_clip=args.unlearning_grad_clip)
    return unlearn_until_forgotten(run, model, run.setup.clean_subset, rule)[0]


def make_scheduler(optimizer, args):
    if args.lr_scheduler == "MultiStepLR":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(args.steplr_milestones),
                                                    gamma=args.steplr_gamma)
    if args.lr_scheduler == "CosineAnnealingLR":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.unlearning_epochs)
    return None


def select_neurons(layers, before, args, logger):
    """Per layer: weight-change scores, z-scores and the selected neurons. Returns {name: [indices]}, table rows."""
    selected, table = {}, []
    for name, module in layers.items():
        scores = neuron_weight_change(before[name], module.weight)
        chosen, z = select_outliers(scores.cpu(), args.mad_threshold, args.max_neurons, args.selection)
        if chosen:
            selected[name] = chosen
        for index in range(len(scores)):
            table.append({"layer": name, "neuron": index, "score": float(scores[index]), "z": float(z[index]),
                          "selected": index in chosen})
        if args.scope == "head" or chosen:
            logger.info(f"{name}: weight-change scores " + ", ".join(f"{float(s):.4f}" for s in scores))
            logger.info(f"{name}: selected neurons {chosen}")
    return selected, table


def reinitialise(model, selected, args):
    """Redraw the selected neurons' weights from U(-sqrt(2/fan_in), sqrt(2/fan_in)) and zero their biases.
    Returns [(weight parameter, neuron indices, their original weights)] for the cosine penalty."""
    modules = dict(model.named_modules())
    originals = []
    with torch.no_grad():
        for name, rows in selected.items():
            module = modules[name]
            index = torch.tensor(rows, device=module.weight.device)
            originals.append((module.weight, index, module.weight[index].detach().clone()))
            if not args.init:
                continue
            fan_in = module.weight[0].numel()
            bound = math.sqrt(2.0 / fan_in)
            module.weight[index] = torch.empty_like(module.weight[index]).uniform_(-bound, bound)
            if module.bias is not None:
                module.bias[index] = 0.0
    return originals


def relearn(run, model, originals):
    """Fine-tune everything on the clean subset with CE + alpha * sum_i cos(w_i, w_i_original)."""
    setup, args = run.setup, run.args
    optimizer = torch.optim.SGD(model.parameters(), lr=args.relearn_lr, momentum=args.sgd_momentum)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.relearn_epochs)
    scaler = grad_scaler(setup.device, args.amp)

    def penalised_loss(logits, labels, _model):
        loss = F.cross_entropy(logits, labels)
        for weight, index, original in originals:
            loss = loss + args.relearn_alpha * F.cosine_similarity(
                weight[index].flatten(1).float(), original.flatten(1).float(), dim=1).sum()
        return loss, loss

    def extra_forward(x, _y):
        with torch.no_grad(), autocast(setup.device, args.amp):
            model(x)

    rows = []
    epochs = tqdm(range(args.relearn_epochs), desc="relearning", disable=not args.progress, leave=False)
    for epoch in epochs:
        stats = train_epoch(model, setup.clean_subset, optimizer, batch_size=args.batch_size,
                            augment=setup.augmentation, generator=run.generator, amp=args.amp, scaler=scaler,
                            objective=penalised_loss, after_step=extra_forward if args.extra_bn_update else None)
        scheduler.step()
        epochs.set_postfix(train_acc=f"{stats.acc:.3f}")
        run.end_epoch(rows, "relearn", epoch, stats, model, f"relearning epoch {epoch}: loss {stats.loss:.4f}, "
                      f"train acc {stats.acc:.4f} ({stats.seconds:.1f} s)",
                      images=stats.samples * (2 if args.extra_bn_update else 1))
    return rows


# ---------------------------------------------------------------- feature pruning (an option, not the reference's)
# Head-only re-initialisation leaves a backdoor that lives in the features (docs/defenses.md, "ULRL: where its
# accuracy goes"). The unlearned model predicts the attack's target class for almost every clean image, so the conv
# channels that drive that logit there are the backdoor's feature channels; they are found with clean data alone.

def unlearned_target(model, data):
    """The class the unlearned model predicts most often on the clean subset."""
    predictions, _ = predict(model, data)
    return int(torch.bincount(predictions.cpu()).argmax())


def target_contributions(model, data, target, batch_size=256):
    """{conv layer name: per-output-channel mean over `data` of activation x d(target logit)/d(activation)}, the
    first-order share of each channel in the target logit, in float32 and eval mode."""
    convs = {name: module for name, module in model.named_modules() if isinstance(module, nn.Conv2d)}
    if not convs:
        return {}
    outputs = {}
    hooks = [module.register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out))
             for name, module in convs.items()]
    totals = {name: 0.0 for name in convs}
    with eval_mode(model, hooks=hooks):
        for x, _ in data.batches(batch_size):
            outputs.clear()
            logits = model(x)
            grads = torch.autograd.grad(logits[:, target].sum(), [outputs[name] for name in convs])
            for name, grad in zip(convs, grads):
                totals[name] = totals[name] + (outputs[name] * grad).sum((0, 2, 3)).detach().float()
    model.zero_grad(set_to_none=True)
    return {name: total / len(data) for name, total in totals.items()}


def channel_ranking(contributions):
    """[(layer, channel)] of every conv channel by decreasing contribution (stable on ties)."""
    entries = [(value, name, channel) for name, values in contributions.items()
               for channel, value in enumerate(values.cpu().tolist())]
    return [(name, channel) for _value, name, channel in sorted(entries, key=lambda entry: -entry[0])]


def zero_channels(model, channels):
    """Zero the output-channel weights (and biases) of `channels` [(conv name, channel)] and keep them zero while
    training: hooks zero their gradients. Returns the hook handles (remove them when training is over)."""
    modules = dict(model.named_modules())
    by_layer = {}
    for name, channel in channels:
        by_layer.setdefault(name, []).append(channel)
    handles = []
    with torch.no_grad():
        for name, rows in by_layer.items():
            module = modules[name]
            index = torch.tensor(rows, device=module.weight.device)
            for parameter in (module.weight, module.bias):
                if parameter is None:
                    continue
                parameter[index] = 0.0
                keep = torch.ones_like(parameter)
                keep[index] = 0.0
                handles.append(parameter.register_hook(lambda grad, keep=keep: grad * keep))
    return handles


def choose_pruning(run, ranking):
    """The largest --prune_shares share of the ranked channels whose zeroing keeps the backdoored model's accuracy
    on the clean subset within --prune_tolerance of its own (clean data only). Returns the channels and the rows."""
    args, setup = run.args, run.setup
    model = setup.fresh_backdoored_model()
    baseline = accuracy(model, setup.clean_subset)
    counts = [round(share * len(ranking)) for share in args.prune_shares]
    accuracies = []
    for count in counts:
        trial = setup.fresh_backdoored_model()
        for handle in zero_channels(trial, ranking[:count]):
            handle.remove()
        accuracies.append(accuracy(trial, setup.clean_subset))
    chosen = largest_within_tolerance(counts, accuracies, baseline, args.prune_tolerance) or 0
    rows = [{"share": share, "channels": count, "clean_subset_acc": acc, "chosen": count == chosen}
            for share, count, acc in zip(args.prune_shares, counts, accuracies)]
    run.logger.info(f"feature pruning: clean-subset accuracy {baseline:.4f} unpruned; "
                    + ", ".join(f"{row['channels']} channels {row['clean_subset_acc']:.4f}" for row in rows)
                    + f"; pruning {chosen} (tolerance {args.prune_tolerance})")
    return ranking[:chosen], rows


def check_args(args):
    require_at_least(args, 0, "unlearning_epochs", "relearn_epochs")
    for share in args.prune_shares or []:
        require(0 < share < 1, f"--prune_shares must lie in (0, 1), got {share}")
    require_in(args, "prune_tolerance", "[0, 1]")


def defend(run):
    setup, args = run.setup, run.args
    with run.phase("unlearn"):
        layers = scored_layers(setup.model, args, setup.record.num_classes)
        weights_before = {name: module.weight.detach().float().clone() for name, module in layers.items()}
        run.add_epoch_table("unlearn_df", unlearn(run))
        selected, score_table = select_neurons(layers, weights_before, args, run.logger)
    write_table(score_table, run.path / "neuron_scores.csv")
    run.summary.update(selected=selected, unlearning_epochs_run=len(run.epoch_tables["unlearn_df"]))
    pruned = []
    if args.prune_shares:
        with run.phase("prune"):
            target = unlearned_target(setup.model, setup.clean_subset)
            ranking = channel_ranking(target_contributions(setup.model, setup.clean_subset, target))
            pruned, pruning_table = choose_pruning(run, ranking)
        write_table(pruning_table, run.path / "pruning.csv")
        run.summary.update(unlearned_target=target, pruned_channels=len(pruned))

    with run.phase("relearn"):
        model = setup.fresh_backdoored_model()  # the unlearned model is discarded; only the selection is kept
        originals = reinitialise(model, selected, args)
        handles = zero_channels(model, pruned)
        if not selected:
            run.logger.info("no neuron selected: relearning is plain fine-tuning")
        run.add_epoch_table("relearn_df", relearn(run, model, originals))
        for handle in handles:
            handle.remove()
    return model


def main(argv=None):
    return run_defense(build_parser(), argv, DEFENSE, defend, check_args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
