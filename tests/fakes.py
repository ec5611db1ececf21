"""Small stand-ins several test files share: a tiny model with both BatchNorm kinds, random images, the part of a
DefenseRun that algorithms read, and a record folder as the batch runner sees it."""
import json
import logging
import types

import torch
import torch.nn as nn

from utils.defense_run import DefenseRun
from utils.tensor_data import Augmentation, DeviceImages


class Tiny(nn.Module):
    """conv -> BN2d -> ReLU -> pool -> linear -> BN1d -> linear: both BatchNorm kinds, and a non-affine one."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 6)
        self.bn_fc = nn.BatchNorm1d(6)
        self.plain = nn.BatchNorm1d(6, affine=False)  # nothing to mask or prune
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        out = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.head(self.plain(torch.relu(self.bn_fc(self.fc(out)))))


def tiny(seed=0):
    torch.manual_seed(seed)
    model = Tiny()
    with torch.no_grad():  # BatchNorm away from its identity initialisation
        for bn in (model.bn, model.bn_fc):
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1.0, 1.0)
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def small_data(count=24, seed=0):
    """`count` random 8x8 RGB images with labels 0, 1, 2, 0, ... (the tests of rnp.py and anp.py use them too)."""
    images = torch.randint(0, 256, (count, 8, 8, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return DeviceImages(images.numpy(), [i % 3 for i in range(count)], "cpu", (0.5,) * 3, (0.25,) * 3)


def fake_run(defaults, **options):
    """What a defense's algorithm reads of its DefenseRun, for tiny models on the CPU: options (`defaults` updated
    by `options`), augmentation, a seeded generator, a logger; images counted per phase in .counted."""
    counted = {}
    args = types.SimpleNamespace(**{**defaults, "amp": False, "batch_size": 8, "eval_every": 0, **options})
    run = types.SimpleNamespace(
        args=args, setup=types.SimpleNamespace(augmentation=Augmentation(crop_padding=1, flip=True)),
        device=torch.device("cpu"), generator=torch.Generator().manual_seed(0), logger=logging.getLogger("test"),
        counted=counted, count_images=lambda phase, count: counted.update({phase: counted.get(phase, 0) + count}),
        epoch_row=lambda epoch, stats, model, force_eval=False: {"epoch": epoch, "batch": stats.batches,
                                                                 "train_acc": stats.acc})
    run.end_epoch = types.MethodType(DefenseRun.end_epoch, run)  # the frame's own bookkeeping over these stand-ins
    return run


def fake_record(root, name, metrics=None, defenses=None):
    """A record folder as the batch runner and the benchmark see it: a placeholder attack_result.pt, the attack's
    summary.json when `metrics` is given, and one defense summary per (acc, asr, ra, der, seconds) in `defenses`."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "attack_result.pt").write_bytes(b"not a record")
    if metrics:
        (folder / "summary.json").write_text(json.dumps({"metrics": metrics, "seconds": 100.0}))
    for defense, (acc, asr, ra, der, seconds) in (defenses or {}).items():
        out = folder / "defense" / defense
        out.mkdir(parents=True)
        (out / "summary.json").write_text(json.dumps({"after": {"test_acc": acc, "test_asr": asr, "test_ra": ra},
                                                      "der": der, "seconds": {"total": seconds}}))
    return folder
