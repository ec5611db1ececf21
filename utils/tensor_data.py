"""Images as tensors on the device, with batched augmentation and normalisation.

The few hundred clean samples and the test sets fit on the device as uint8; random crop (zero padding) and
horizontal flip run on whole batches, which replaces the per-sample PIL pipeline of the reference scripts.
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augmentation:
    """BackdoorBench's training transform: RandomCrop(size, padding) then RandomHorizontalFlip (if flip)."""
    crop_padding: int = 4
    flip: bool = True


class DeviceImages:
    """uint8 images (N, H, W, C) and their labels on `device`; yields normalised float batches (N, C, H, W).

    `extra_labels` holds further per-sample label arrays (e.g. original labels of poisoned samples).
    """

    def __init__(self, images, labels, device, mean, std, **extra_labels):
        self.images = torch.as_tensor(np.asarray(images, dtype=np.uint8)).to(device)
        if self.images.ndim == 3:
            self.images = self.images[..., None]
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64)).to(device)
        self.extra = {key: torch.as_tensor(np.asarray(value, dtype=np.int64)).to(device)
                      for key, value in extra_labels.items()}
        self.device = torch.device(device)
        channels = self.images.shape[-1]
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, channels, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, channels, 1, 1)

    def __len__(self):
        return len(self.labels)

    def normalise(self, images_uint8):
        """uint8 NHWC -> float NCHW (channels_last memory), as ToTensor() then Normalize(mean, std)."""
        return self.from_pixels(images_uint8.permute(0, 3, 1, 2).float())

    def from_pixels(self, pixels):
        """Float NCHW pixels in [0, 255] -> the normalised batch the model sees."""
        return (pixels / 255.0 - self.mean) / self.std

    def pixels(self, x):
        """A normalised batch back to float NCHW pixels in [0, 255] (attacks that poison batches in pixel space)."""
        return (x * self.std + self.mean) * 255.0

    def batches(self, batch_size, shuffle=False, augment=None, generator=None, with_extra=False):
        """Yield (x, y) (or (x, y, extra) with `with_extra`); the last partial batch is kept."""
        count = len(self)
        order = torch.randperm(count, generator=generator, device="cpu").to(self.device) if shuffle else None
        for start in range(0, count, batch_size):
            index = order[start:start + batch_size] if shuffle else slice(start, start + batch_size)
            images = self.images[index]
            if augment is not None:
                images = augment_batch(images, augment, generator)
            x = self.normalise(images)
            y = self.labels[index]
            if with_extra:
                yield x, y, {key: value[index] for key, value in self.extra.items()}
            else:
                yield x, y


def subset(data, indices):
    """The samples `indices` of a DeviceImages, as a new DeviceImages on the same device."""
    index = torch.as_tensor(indices, dtype=torch.long, device=data.device)
    extra = {key: value[index].cpu().numpy() for key, value in data.extra.items()}
    return DeviceImages(data.images[index].cpu().numpy(), data.labels[index].cpu().numpy(), data.device,
                        data.mean.flatten().tolist(), data.std.flatten().tolist(), **extra)


def augment_batch(images, augment, generator=None):
    """Random crop with zero padding and optional horizontal flip, per sample, on a uint8 NHWC batch."""
    count, height, width, _ = images.shape
    pad = augment.crop_padding
    device = images.device
    if pad > 0:
        padded = F.pad(images.permute(0, 3, 1, 2), (pad, pad, pad, pad)).permute(0, 2, 3, 1)
        top = torch.randint(0, 2 * pad + 1, (count,), generator=generator).to(device)
        left = torch.randint(0, 2 * pad + 1, (count,), generator=generator).to(device)
        rows = (top[:, None] + torch.arange(height, device=device))[:, :, None]
        cols = (left[:, None] + torch.arange(width, device=device))[:, None, :]
        images = padded[torch.arange(count, device=device)[:, None, None], rows, cols]
    if augment.flip:
        flip = (torch.rand(count, generator=generator) < 0.5).to(device)
        images = torch.where(flip[:, None, None, None], images.flip(2), images)
    return images
