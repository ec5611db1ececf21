"""Clean unlearning and the neuron weight change it leaves, shared by ULRL, RNP and TSBD: gradient ascent on the
clean subset until the model has forgotten it, then how far each output neuron's weights moved."""
from dataclasses import dataclass
from typing import Callable, Optional

from tqdm import tqdm

from utils.precision import grad_scaler
from utils.training import gradient_ascent_objective, train_epoch


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


def unlearn(run, model, data, rule, label="unlearning"):
    """Gradient ascent on `data` with `rule`, counted as phase "unlearn" and logged one line per epoch; the last
    epoch is the first whose accuracy is <= rule.threshold. Returns (epoch rows, last accuracy)."""
    args = run.args
    scaler = grad_scaler(run.device, args.amp)
    rows, accuracy = [], None
    epochs = tqdm(range(rule.max_epochs), desc=label, disable=not getattr(args, "progress", False), leave=False)
    for epoch in epochs:
        stats = train_epoch(model, data, rule.optimizer, batch_size=args.batch_size, augment=run.setup.augmentation,
                            generator=run.generator, amp=args.amp, scaler=scaler, objective=gradient_ascent_objective,
                            grad_clip=rule.grad_clip, shuffle=rule.shuffle)
        if rule.scheduler is not None:
            rule.scheduler.step()
        accuracy = stats.acc if rule.accuracy is None else rule.accuracy(model, stats)
        run.count_images("unlearn", rule.images_per_sample * stats.samples)
        rows.append(run.epoch_row(epoch, stats, model))
        epochs.set_postfix(acc=f"{accuracy:.3f}")
        run.logger.info(f"{label} epoch {epoch}: clean-subset loss {stats.loss:.4f}, accuracy {accuracy:.4f} "
                        f"({stats.seconds:.1f} s)")
        if accuracy <= rule.threshold:
            run.logger.info(f"{label} stopped after epoch {epoch}: accuracy {accuracy:.4f} <= {rule.threshold}")
            break
    else:
        run.logger.info(f"{label} ran all {rule.max_epochs} epochs without reaching accuracy <= {rule.threshold}")
    epochs.close()  # an early stop leaves the bar open (frozen at its last epoch) otherwise
    return rows, accuracy


def neuron_weight_change(before, after):
    """L1 change of each output neuron's weights (row of a Linear, output channel of a conv): |after - before|
    summed over all but the first dimension, in float32."""
    return (after.detach().float() - before.detach().float()).abs().flatten(1).sum(1)
