"""A trigger as Neural Cleanse reverse-engineers it: a mask m in [0, 1]^{HxW} and a pattern in pixel space [0, 1],
optimised through a tanh parametrisation; stamped as (1 - m) * x + m * pattern on a normalised batch (every trigger
on every image) or on uint8 pixels; one per class in ReversedTriggers, saved and drawn."""
from dataclasses import dataclass

import torch

from utils.triggers import to_uint8_images


def bounded(raw):
    """A free parameter -> values in (0, 1), as the paper's tanh parametrisation."""
    return torch.tanh(raw) / 2 + 0.5


def unbounded(values):
    return torch.atanh((2 * values - 1).clamp(-0.999, 0.999))


def stamp_normalised(x, masks, patterns, data):
    """Every trigger on every image of the normalised batch x (B, C, H, W): (A * B, C, H, W), trigger-major.
    Normalisation is affine per channel, so stamping the normalised pattern on the normalised image equals
    normalising the stamped pixels."""
    pattern = data.from_pixels(patterns * 255.0)
    stamped = (1 - masks[:, None]) * x[None] + (masks * pattern)[:, None]
    return stamped.flatten(0, 1)


def stamp_pixels(images, mask, pattern):
    """uint8 NHWC images with one trigger (mask (1, H, W), pattern (C, H, W) in [0, 1]) -> uint8 NHWC numpy."""
    pixels = images.permute(0, 3, 1, 2).float()
    return to_uint8_images(((1 - mask) * pixels + mask * pattern * 255.0).cpu())


@dataclass
class ReversedTriggers:
    masks: torch.Tensor  # (K, 1, H, W) in [0, 1]
    patterns: torch.Tensor  # (K, C, H, W) pixels in [0, 1]
    searches: list  # one search record per class (NC: its ClassSearch)
    reached: list  # whether each class's trigger ever reached the success threshold
    images: int  # stamped images passed through the model

    @property
    def norms(self):
        return self.masks.flatten(1).sum(1)

    def save(self, path):
        torch.save({"masks": self.masks.cpu(), "patterns": self.patterns.cpu()}, path)


def save_trigger_grid(triggers, flagged, path, columns=10):
    """A PNG of every class's mask (grey) above its trigger (mask * pattern), titled with its norm."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    count = len(triggers.masks)
    columns = min(columns, count)
    rows = -(-count // columns)
    figure, axes = plt.subplots(2 * rows, columns, figsize=(1.3 * columns, 2.8 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for k in range(count):
        mask, pattern = triggers.masks[k].float().cpu().numpy(), triggers.patterns[k].float().cpu().numpy()
        top, bottom = axes[2 * (k // columns), k % columns], axes[2 * (k // columns) + 1, k % columns]
        top.imshow(mask[0], cmap="gray", vmin=0, vmax=1)
        top.set_title(f"{k}: {float(mask.sum()):.1f}" + (" *" if k in flagged else ""), fontsize=7,
                      color="red" if k in flagged else "black")
        trigger = (mask * pattern).transpose(1, 2, 0)
        grey = trigger.shape[-1] == 1
        bottom.imshow(trigger[..., 0] if grey else trigger, cmap="gray" if grey else None, vmin=0, vmax=1)
    figure.suptitle("reversed masks (top) and triggers (bottom); class: L1 norm, * flagged", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
