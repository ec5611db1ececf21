"""Clean unlearning and the neuron weight change it leaves, shared by ULRL, RNP and TSBD: gradient ascent on the
clean subset until the model has forgotten it, then how far each output neuron's weights moved."""
import copy
from dataclasses import dataclass
from typing import Callable, Optional

import torch.nn as nn
from tqdm import tqdm

from utils.errors import UserError
from utils.precision import grad_scaler
from utils.tensor_data import augment_batch
from utils.training import accuracy, gradient_ascent_objective, train_epoch


@dataclass
class UnlearningRule:
    optimizer: object  # a torch optimizer over the model's parameters
    threshold: float  # stop after the epoch whose accuracy is <= this
    max_epochs: int
    scheduler: object = None  # stepped once per epoch
    grad_clip: Optional[float] = None
    shuffle: bool = True
    # accuracy(model, stats) checked against the threshold; default: the epoch's running training accuracy
    accuracy: Optional[Callable] = None
    images_per_sample: int = 1  # images the phase processes per training sample (a check pass doubles it)


def augmented_accuracy(model, data, augmentation, generator):
    """Eval-mode accuracy of one augmented draw of `data` (TSBD's reference checks its unlearning this way)."""
    view = copy.copy(data)  # the same device and normalisation, other images
    view.images, view.extra = augment_batch(data.images, augmentation, generator), {}
    return accuracy(model, view)


def unlearn(run, model, data, rule, label="unlearning"):
    """Gradient ascent on `data` with `rule`, counted as phase "unlearn" and logged one line per epoch; the last
    epoch is the first whose accuracy is <= rule.threshold. Returns (epoch rows, last accuracy)."""
    args = run.args
    scaler = grad_scaler(run.device, args.amp)
    rows, epoch_accuracy = [], None
    epochs = tqdm(range(rule.max_epochs), desc=label, disable=not getattr(args, "progress", False), leave=False)
    for epoch in epochs:
        stats = train_epoch(model, data, rule.optimizer, batch_size=args.batch_size, augment=run.setup.augmentation,
                            generator=run.generator, amp=args.amp, scaler=scaler, objective=gradient_ascent_objective,
                            grad_clip=rule.grad_clip, shuffle=rule.shuffle)
        if rule.scheduler is not None:
            rule.scheduler.step()
        epoch_accuracy = stats.acc if rule.accuracy is None else rule.accuracy(model, stats)
        epochs.set_postfix(acc=f"{epoch_accuracy:.3f}")
        run.end_epoch(rows, "unlearn", epoch, stats, model, f"{label} epoch {epoch}: clean-subset loss "
                      f"{stats.loss:.4f}, accuracy {epoch_accuracy:.4f} ({stats.seconds:.1f} s)",
                      images=rule.images_per_sample * stats.samples)
        if epoch_accuracy <= rule.threshold:
            run.logger.info(f"{label} stopped after epoch {epoch}: accuracy {epoch_accuracy:.4f} <= "
                            f"{rule.threshold}")
            break
    else:
        run.logger.info(f"{label} ran all {rule.max_epochs} epochs without reaching accuracy <= {rule.threshold}")
    epochs.close()  # an early stop leaves the bar open (frozen at its last epoch) otherwise
    return rows, epoch_accuracy


def weight_change(before, after):
    """|after - before| of every weight, in float32."""
    return (after.detach().float() - before.detach().float()).abs()


def neuron_weight_change(before, after):
    """L1 change of each output neuron's weights (row of a Linear, output channel of a conv): the weight change
    summed over all but the first dimension."""
    return weight_change(before, after).flatten(1).sum(1)


# ---------------------------------------------------------------- TSBD's neuron weight change (NWC) over conv layers

def nwc_layers(model, skip=("shortcut", "downsample", "proj")):
    """{parameter name: weight} of every Conv2d layer whose qualified name has no component in `skip`."""
    skip = set(skip)
    convs = {name: module for name, module in model.named_modules() if isinstance(module, nn.Conv2d)}
    if not convs:
        raise UserError(f"TSBD scores the output channels of Conv2d layers, and this model "
                        f"({type(model).__name__}) has none")
    layers = {f"{name}.weight": module.weight for name, module in convs.items() if not skip & set(name.split("."))}
    if not layers:
        raise UserError(f"every Conv2d layer of this model is skipped by --skip_layers {' '.join(sorted(skip))}")
    return layers


def weight_changes(original, unlearned):
    """{name: |W_unlearned - W_original|} per weight, for the layers of `original` (a nwc_layers dict)."""
    return {name: weight_change(weight, unlearned[name]) for name, weight in original.items()}


def rank_neurons(deltas):
    """[(layer, channel, NWC)] of every output channel, NWC = sum of its weights' changes rounded to 4 decimals,
    sorted by decreasing NWC; the stable sort keeps layer and channel order on ties."""
    entries = []
    for name, delta in deltas.items():
        scores = delta.flatten(1).sum(1).double().cpu().tolist()
        entries.extend((name, channel, round(score, 4)) for channel, score in enumerate(scores))
    return sorted(entries, key=lambda entry: -entry[2])


def write_nwc(path, ranking):
    with open(path, "w") as handle:
        handle.write("No \t Layer_Name \t Neuron_Idx \t Score \n")
        for number, (name, channel, score) in enumerate(ranking):
            handle.write(f"{number} \t {name} \t {channel} \t {score:.4f} \n")
