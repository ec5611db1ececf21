"""One training epoch and the ACC / ASR / RA evaluation, shared by every defense and attack; `train_classifier`,
the whole training run of an attack (optimizer, learning-rate schedule, epochs) from a recipe."""
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils.errors import UserError
from utils.precision import autocast, grad_scaler
from utils.tensor_data import DeviceImages


def prepare_model(model, device):
    """Model on the device; channels_last for conv nets, which is faster on CPU and on tensor cores."""
    model = model.to(device)
    if any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        model = model.to(memory_format=torch.channels_last)
    return model


@dataclass
class EpochStats:
    loss: float  # mean over batches of the logged loss
    acc: float  # running accuracy of the predictions made before each batch's update
    batches: int
    samples: int
    seconds: float


class EpochTally:
    """The running sums behind an EpochStats, for loops that take their own steps: add(loss, logits, labels) per
    batch; stats() at the end (seconds since the tally began)."""

    def __init__(self):
        self.loss_sum, self.correct, self.samples, self.batches = 0.0, 0, 0, 0
        self.start = time.perf_counter()

    def add(self, loss, logits, labels):
        self.loss_sum += float(loss.detach()) if torch.is_tensor(loss) else float(loss)
        self.correct += int((logits.detach().argmax(1) == labels).sum())
        self.samples += len(labels)
        self.batches += 1

    def stats(self):
        return EpochStats(self.loss_sum / max(self.batches, 1), self.correct / max(self.samples, 1), self.batches,
                          self.samples, time.perf_counter() - self.start)


def cross_entropy_objective(logits, labels, model):
    """The plain training objective: (loss to minimise, loss to log)."""
    loss = F.cross_entropy(logits, labels)
    return loss, loss


def gradient_ascent_objective(logits, labels, model):
    """Unlearning: minimise -CE (gradient ascent on the clean subset), log CE."""
    loss = F.cross_entropy(logits, labels)
    return -loss, loss


def train_epoch(model, data, optimizer, *, batch_size, augment, generator, amp=False, scaler=None,
                objective=cross_entropy_objective, grad_clip=None, after_step=None, shuffle=True, progress=None,
                batch_transform=None):
    """One pass over `data` (a DeviceImages) in train mode.

    objective(logits, labels, model) -> (loss to minimise, loss to log); gradient ascent is an objective that
    returns -CE. grad_clip clips the total gradient L2 norm. after_step(x, y) runs after each optimizer step.
    batch_transform(x, y) -> (x, y) changes each augmented, normalised batch before the forward pass (attacks that
    poison while training: WaNet, BPP, Input-aware); accuracy counts against the labels it returns.
    """
    model.train()
    device = data.device
    tally = EpochTally()
    for x, y in tqdm(data.batches(batch_size, shuffle=shuffle, augment=augment, generator=generator),
                     total=-(-len(data) // batch_size), desc=progress, leave=False, disable=progress is None):
        if batch_transform is not None:
            x, y = batch_transform(x, y)
        with autocast(device, amp):
            logits = model(x)
            loss, logged = objective(logits, y, model)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if after_step is not None:
            after_step(x, y)
        tally.add(logged, logits, y)
    return tally.stats()


@contextmanager
def eval_mode(model, hooks=()):
    """`model` in eval mode for the block (BatchNorm on its running statistics, which stay untouched); afterwards,
    also when the block fails, the hook handles `hooks` are removed and the model is back in the mode it came in."""
    was_training = model.training
    try:
        model.eval()
        yield model
    finally:
        for handle in hooks:
            handle.remove()
        model.train(was_training)


@torch.inference_mode()
def predict(model, data, batch_size=256, progress=None):
    """Eval-mode predictions and per-batch mean losses of `data` (against its labels), in full precision:
    reported metrics must not depend on --amp (bfloat16 flips a few predictions of low-margin models). The model
    comes back in the mode it came in, so an evaluation in the middle of training (--eval_every) changes nothing."""
    predictions, batch_losses = [], []
    with eval_mode(model):
        for x, y in tqdm(data.batches(batch_size), total=-(-len(data) // batch_size), desc=progress, leave=False,
                         disable=progress is None):
            logits = model(x)
            batch_losses.append(float(F.cross_entropy(logits, y)))
            predictions.append(logits.argmax(1))
    return torch.cat(predictions), batch_losses


@dataclass
class EvalSets:
    """The clean test set and the poisoned test set (labels = backdoor labels; extra 'original' labels)."""
    clean_test: DeviceImages
    bd_test: DeviceImages

    def images(self):
        return len(self.clean_test) + len(self.bd_test)


def evaluate(model, sets, batch_size=256, progress=False):
    """test_acc (clean), test_asr (bd_test predicted as the backdoor label), test_ra (bd_test predicted as the
    original label) and mean batch losses, as BackdoorBench's metrics (fractions in [0, 1])."""
    clean_pred, clean_losses = predict(model, sets.clean_test, batch_size, "clean test" if progress else None)
    bd_pred, bd_losses = predict(model, sets.bd_test, batch_size, "poisoned test" if progress else None)
    return {
        "clean_test_loss_avg_over_batch": sum(clean_losses) / len(clean_losses),
        "bd_test_loss_avg_over_batch": sum(bd_losses) / len(bd_losses),
        "test_acc": share_equal(clean_pred, sets.clean_test.labels),
        "test_asr": share_equal(bd_pred, sets.bd_test.labels),
        "test_ra": share_equal(bd_pred, sets.bd_test.extra["original"]),
    }


def share_equal(predictions, labels):
    """Exact share of equal entries (an integer count over the total, not a float32 mean)."""
    return int((predictions == labels).sum()) / len(labels)


def accuracy(model, data, batch_size=256):
    """Eval-mode accuracy of `data` against its labels."""
    predictions, _ = predict(model, data, batch_size)
    return share_equal(predictions, data.labels)


# ---------------------------------------------------------------- a whole training run from a recipe

SCHEDULES = ("CosineAnnealingLR", "OneCycle", "none")
_EPOCH_KEYS = ("epoch", "batches", "samples", "loss", "train_acc", "seconds", "lr")


@dataclass(frozen=True)
class TrainingRecipe:
    """Every number of a training run, under BackdoorBench's option names (the keys of
    config/attack/prototype/<dataset>.yaml)."""
    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.01
    lr_scheduler: str = "CosineAnnealingLR"  # CosineAnnealingLR (per epoch, T_max = epochs), OneCycle, none
    warmup_epochs: float = 0.0  # OneCycle: linear warm-up from lr * warmup_start to lr, then linear decay to 0
    warmup_start: float = 0.1  # OneCycle: the first batch's lr as a share of lr
    sgd_momentum: float = 0.9
    nesterov: bool = False
    wd: float = 0.0005
    label_smoothing: float = 0.0
    amp: bool = False  # autocast on (utils.precision.resolve_amp decides it from --amp)
    grad_clip: float = None
    progress: bool = False

    @classmethod
    def from_options(cls, options):
        """A recipe from an argparse Namespace, a dict or a recipe; keys it does not know are ignored, and missing
        or None values keep the defaults above."""
        if isinstance(options, cls):
            return options
        values = options if isinstance(options, dict) else vars(options)
        known = {f.name for f in fields(cls)}
        recipe = cls(**{key: value for key, value in values.items() if key in known and value is not None})
        if recipe.lr_scheduler not in SCHEDULES:
            raise UserError(f"lr_scheduler must be one of {', '.join(SCHEDULES)}, not {recipe.lr_scheduler!r}")
        return recipe

    def lr_factor(self, step, steps_per_epoch):
        """The learning rate of optimizer step `step` (0-based) as a share of `lr`."""
        total = self.epochs * steps_per_epoch
        if self.lr_scheduler == "OneCycle":
            warmup = self.warmup_epochs * steps_per_epoch
            if step < warmup:
                return self.warmup_start + (1 - self.warmup_start) * step / warmup
            return max(0.0, (total - step) / max(total - warmup, 1))
        if self.lr_scheduler == "CosineAnnealingLR":
            # BackdoorBench steps CosineAnnealingLR(T_max=epochs) once per epoch
            epoch = step // steps_per_epoch
            return 0.5 * (1 + math.cos(math.pi * epoch / max(self.epochs, 1)))  # LambdaLR asks at step 0 even for 0 epochs
        return 1.0


def smoothed_cross_entropy(label_smoothing):
    """A train_epoch objective: cross-entropy with label smoothing (the plain objective when 0)."""
    if not label_smoothing:
        return cross_entropy_objective

    def objective(logits, labels, model):
        loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        return loss, loss
    return objective


def keep_freed_memory():
    """Ask glibc to keep freed memory for reuse instead of returning each large block to the OS: by default every
    activation above its mmap threshold is unmapped when freed and page-faulted back in on the next batch, which
    on a virtual machine made CPU training up to 1.8x slower. Returns whether it applied (False without glibc)."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 1 << 30))


def train_classifier(model, train_data, recipe, augment, generator, log=None, after_epoch=None, batch_transform=None):
    """Train `model` (already on the device) on `train_data` (a DeviceImages) with SGD as `recipe` says (a
    TrainingRecipe, or a Namespace / dict of the prototype YAML's options); returns one dict per epoch with epoch,
    batches, samples, loss, train_acc, seconds and lr (its first batch's). `log` is a logger (or anything with
    .info) for one line per epoch; after_epoch(epoch, row) runs after each epoch and may add metrics to its row;
    batch_transform goes to train_epoch."""
    recipe = TrainingRecipe.from_options(recipe)
    device = train_data.device
    if device.type == "cpu":
        keep_freed_memory()
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.sgd_momentum,
                                weight_decay=recipe.wd, nesterov=recipe.nesterov and recipe.sgd_momentum > 0)
    steps_per_epoch = -(-len(train_data) // recipe.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: recipe.lr_factor(step, steps_per_epoch))
    scaler = grad_scaler(device, recipe.amp)
    objective = smoothed_cross_entropy(recipe.label_smoothing)
    history = []
    # one bar over every batch of the run: its ETA is the whole training's, not the current epoch's
    with tqdm(total=recipe.epochs * steps_per_epoch, desc="training", unit="batch", leave=False,
              disable=not recipe.progress) as bar:
        def after_step(x, y):
            schedule.step()
            bar.update()

        for epoch in range(recipe.epochs):
            lr = optimizer.param_groups[0]["lr"]
            bar.set_postfix(epoch=f"{epoch + 1}/{recipe.epochs}")
            stats = train_epoch(model, train_data, optimizer, batch_size=recipe.batch_size, augment=augment,
                                generator=generator, amp=recipe.amp, scaler=scaler, objective=objective,
                                grad_clip=recipe.grad_clip, after_step=after_step, batch_transform=batch_transform)
            row = {"epoch": epoch, "batches": stats.batches, "samples": stats.samples, "loss": stats.loss,
                   "train_acc": stats.acc, "seconds": stats.seconds, "lr": lr}
            history.append(row)
            if after_epoch is not None:
                after_epoch(epoch, row)
            if log is not None:
                log.info(f"epoch {epoch + 1}/{recipe.epochs}: loss {stats.loss:.4f}, train_acc {stats.acc:.4f}, "
                         f"lr {lr:.4g}, {stats.seconds:.1f} s ({stats.samples / max(stats.seconds, 1e-9):.0f} img/s)"
                         + "".join(f", {key} {value:.4f}" for key, value in row.items() if key not in _EPOCH_KEYS))
    return history


def fine_tune(run, model, data, phase, **changes):
    """FT's training run inside a defense's frame (`run`): SGD over `data` as the run's options say (`changes`
    over them), one frame row per epoch (test metrics on the epochs --eval_every asks for) and the images counted
    under `phase`. Returns the epoch rows."""
    recipe = TrainingRecipe.from_options({**vars(run.args), "progress": False, **changes})
    rows = []

    def record_epoch(epoch, history_row):
        stats = EpochStats(history_row["loss"], history_row["train_acc"], history_row["batches"],
                           history_row["samples"], history_row["seconds"])
        row = run.end_epoch(rows, phase, epoch, stats, model)
        # train_classifier logs the epoch, with the test metrics an evaluated epoch got
        history_row.update({key: value for key, value in row.items() if key.startswith("test_")})

    train_classifier(model, data, recipe, run.setup.augmentation, run.generator, log=run.logger,
                     after_epoch=record_epoch)
    return rows
