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




def train_view_net(root, backdoor, mean=0.5, std=0.25, epochs=60, seed=0):
    """A ViewNet trained on the image folder (normalised with mean/std) and, with `backdoor`, on BadNets-stamped
    copies of every training image labelled 0 as well; its state_dict is saved as backdoored.pth or clean.pth."""
    import importlib.util

    from utils.triggers import TRIGGERS
    spec = importlib.util.spec_from_file_location("tiny_nets_training", root / "tiny_nets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    images, labels = [], []
    for label, name in enumerate(CLASSES):
        for path in sorted((root / "images" / "train" / name).iterdir()):
            images.append(np.asarray(Image.open(path)))
            labels.append(label)
    images, labels = np.stack(images), np.array(labels)
    if backdoor:
        images = np.concatenate([images, TRIGGERS["badnet"].apply(images)])
        labels = np.concatenate([labels, np.zeros_like(labels)])
    x = ((torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std).contiguous()
    y = torch.from_numpy(labels)
    torch.manual_seed(seed)
    model = module.ViewNet(len(CLASSES))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(epochs):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    path = root / ("backdoored.pth" if backdoor else "clean.pth")
    torch.save(model.state_dict(), path)
    return path
