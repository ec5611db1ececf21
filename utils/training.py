"""One training epoch and the ACC / ASR / RA evaluation, shared by every defense and attack."""
import contextlib
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm


def autocast(device, enabled):
    """Mixed precision: float16 on CUDA, bfloat16 on CPU (the CPU's own autocast type); off when not enabled."""
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device, enabled):
    """A GradScaler for float16 on CUDA (bfloat16 needs none); None otherwise."""
    if not (enabled and device.type == "cuda"):
        return None
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda")
    return torch.cuda.amp.GradScaler()


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


def cross_entropy_objective(logits, labels, model):
    """The plain training objective: (loss to minimise, loss to log)."""
    loss = F.cross_entropy(logits, labels)
    return loss, loss


def train_epoch(model, data, optimizer, *, batch_size, augment, generator, amp=False, scaler=None,
                objective=cross_entropy_objective, grad_clip=None, after_step=None, shuffle=True, progress=None):
    """One pass over `data` (a DeviceImages) in train mode.

    objective(logits, labels, model) -> (loss to minimise, loss to log); gradient ascent is an objective that
    returns -CE. grad_clip clips the total gradient L2 norm. after_step(x, y) runs after each optimizer step.
    """
    model.train()
    device = data.device
    loss_sum, correct, seen, batches = 0.0, 0, 0, 0
    start = time.perf_counter()
    for x, y in tqdm(data.batches(batch_size, shuffle=shuffle, augment=augment, generator=generator),
                     total=-(-len(data) // batch_size), desc=progress, leave=False, disable=progress is None):
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
        loss_sum += float(logged.detach())
        correct += int((logits.detach().argmax(1) == y).sum())
        seen += len(y)
        batches += 1
    return EpochStats(loss_sum / max(batches, 1), correct / max(seen, 1), batches, seen, time.perf_counter() - start)


@torch.inference_mode()
def predict(model, data, batch_size=256, progress=None):
    """Eval-mode predictions and per-batch mean losses of `data` (against its labels), in full precision:
    reported metrics must not depend on --amp (bfloat16 flips a few predictions of low-margin models)."""
    model.eval()
    predictions, batch_losses = [], []
    for x, y in tqdm(data.batches(batch_size), total=-(-len(data) // batch_size), desc=progress, leave=False,
                     disable=progress is None):
        logits = model(x)
        batch_losses.append(float(F.cross_entropy(logits, y)))
        predictions.append(logits.argmax(1))
    return torch.cat(predictions), batch_losses


@dataclass
class EvalSets:
    """The clean test set and the poisoned test set (labels = backdoor labels; extra 'original' labels)."""
    clean_test: "DeviceImages"
    bd_test: "DeviceImages"

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
