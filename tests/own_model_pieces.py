"""The pieces a researcher brings (tests of sh/make_record.py and defense_api.py): a tiny model module with one
network that calls x.view and has no BatchNorm and one with a softmax at the output, their weights, a whole pickled
model, and a tiny image folder (16x16, 3 classes, 12 train / 6 test images each)."""
import sys

import numpy as np
import torch
from PIL import Image

CLASSES = ("ant", "bee", "cat")
NETS = '''
import torch.nn as nn
import torch.nn.functional as F


class ViewNet(nn.Module):  # no BatchNorm; x.view fails on channels_last activations
    def __init__(self, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.fc(x.view(x.size(0), -1))


class SoftmaxNet(ViewNet):
    def forward(self, x):
        return F.softmax(super().forward(x), dim=1)


def view_net(num_classes, img_size):
    assert img_size == (16, 16, 3)
    return ViewNet(num_classes)
'''



def write_own_model_pieces(root):
    """tiny_nets.py, images/{train,test}/<class>/img<i>.png, view.pth, softmax.pth (nested under state_dict) and
    whole_model.pt under `root`; returns root."""
    (root / "tiny_nets.py").write_text(NETS)
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("test", 6)):
        for label, name in enumerate(CLASSES):
            folder = root / "images" / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = rng.integers(0, 60, size=(16, 16, 3)) + 80 * label
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"img{index}.png")
    sys.path.insert(0, str(root))
    try:
        import tiny_nets
        torch.manual_seed(0)
        torch.save(tiny_nets.ViewNet(3).state_dict(), root / "view.pth")
        torch.save({"state_dict": tiny_nets.SoftmaxNet(3).state_dict(), "epoch": 3}, root / "softmax.pth")
        torch.save(tiny_nets.SoftmaxNet(3), root / "whole_model.pt")  # a whole pickled model
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("tiny_nets", None)
    return root


