"""The trigger networks of the input-aware dynamic backdoor (Nguyen & Tran, NeurIPS 2020), as BackdoorBench builds
them: an encoder-decoder that maps a normalised image to a pattern in [0, 1] pixel space, and the same network with
one output channel that, after a steep threshold, gives the trigger's mask. Module names match BackdoorBench's
`InputAwareGenerator`, so state dicts load in either direction.
"""
from collections import OrderedDict

import torch
import torch.nn as nn

EPSILON = 1e-7  # BackdoorBench's _EPSILON: keeps tanh / (2 + eps) + 0.5 strictly inside (0, 1)


def conv_block(in_channels, out_channels, relu=True):
    """BackdoorBench's Conv2dBlock: 3x3 conv, batch norm (momentum 0.05), optional ReLU."""
    layers = [("conv2d", nn.Conv2d(in_channels, out_channels, 3, 1, 1)),
              ("batch_norm", nn.BatchNorm2d(out_channels, eps=1e-5, momentum=0.05))]
    if relu:
        layers.append(("relu", nn.ReLU(inplace=True)))
    return nn.Sequential(OrderedDict(layers))


class InputAwareGenerator(nn.Sequential):
    """Encoder (`steps` x [conv, conv, 2x2 max-pool], channels doubling from `channel_init`), a middle conv, decoder
    (`steps` x [bilinear 2x upsample, conv, conv]); the output squashed to [0, 1] by tanh / (2 + eps) + 0.5.
    Input: normalised images (N, in_channels, H, W) with H, W divisible by 2 ** steps."""

    def __init__(self, in_channels=3, out_channels=None, channel_init=32, steps=3):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        current, following = in_channels, channel_init
        for step in range(steps):
            self.add_module(f"convblock_down_{2 * step}", conv_block(current, following))
            self.add_module(f"convblock_down_{2 * step + 1}", conv_block(following, following))
            self.add_module(f"downsample_{step}", nn.MaxPool2d(2, 2))
            if step < steps - 1:
                current, following = following, following * 2
        self.add_module("convblock_middle", conv_block(following, following))
        current = following
        following = current // 2
        for step in range(steps):
            self.add_module(f"upsample_{step}", nn.Upsample(scale_factor=2, mode="bilinear"))
            self.add_module(f"convblock_up_{2 * step}", conv_block(current, current))
            self.add_module(f"convblock_up_{2 * step + 1}", conv_block(current, following, relu=step < steps - 1))
            current, following = following, following // 2
            if step == steps - 2:
                following = out_channels

    def forward(self, x):
        return torch.tanh(super().forward(x)) / (2 + EPSILON) + 0.5


def input_aware_generators(dataset, channels):
    """(pattern generator, mask generator) for a dataset; BackdoorBench uses the smaller layout for MNIST only."""
    channel_init, steps = (16, 2) if dataset == "mnist" else (32, 3)
    return (InputAwareGenerator(channels, channels, channel_init, steps),
            InputAwareGenerator(channels, 1, channel_init, steps))


def threshold(masks):
    """The mask generator's output pushed towards 0 / 1 (BackdoorBench's Threshold: tanh(20 m - 10))."""
    return torch.tanh(masks * 20 - 10) / (2 + EPSILON) + 0.5


def diversity_loss(inputs1, inputs2, outputs1, outputs2, epsilon=EPSILON):
    """Mean over the batch of ||x1 - x2|| / ||g(x1) - g(x2)|| (root-mean-square distances per sample): small when
    different images get different patterns or masks, as the paper's diversity term asks."""
    def distance(a, b):
        # clamped: sqrt has an infinite gradient at 0, and two saturated masks can be exactly equal (NaN otherwise)
        return (a.float() - b.float()).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-12).sqrt()
    return (distance(inputs1, inputs2) / (distance(outputs1, outputs2) + epsilon)).mean()


def blend(images, patterns, masks):
    """The trigger stamped where the mask is on: images + (patterns - images) * masks (any common scale)."""
    return images + (patterns - images) * masks
