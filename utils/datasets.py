"""Clean datasets in BackdoorBench's on-disk layouts and index orders, read into uint8 arrays.

Record indices (clean-subset indices, poisoned sample indices) point into exactly these orders, so each reader
reproduces the order of the torchvision / BackdoorBench class BackdoorBench uses for that dataset.
Images come back as uint8 arrays (N, H, W, C) at the dataset's size, labels as int64 arrays.
"""
import csv
import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from utils.errors import UserError
from utils.registry import Registry

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    img_size: tuple  # (H, W, C), as in attack_result.pt
    mean: tuple
    std: tuple
    random_flip: bool  # BackdoorBench flips horizontally during training for cifar10 only
    marker: str  # a path under the dataset folder that proves the layout is there
    reader: Callable  # reader(folder, train) -> (int64 labels of the whole split, read_images(indices) -> uint8 NHWC)
    how_to_get: str


DATASETS = Registry("dataset")  # name -> DatasetInfo


def register_dataset(**info):
    def decorate(reader):
        DATASETS.add(info["name"], DatasetInfo(reader=reader, **info))
        return reader
    return decorate


def dataset_info(name):
    return DATASETS.lookup(name)


def _unpickle_latin1(path):
    # The official CIFAR pickles are Python 2 pickles of plain lists and a uint8 numpy array.
    from utils.safe_pickle import RestrictedUnpickler
    with open(path, "rb") as handle:
        return RestrictedUnpickler(handle, encoding="latin1").load()


def _cifar_arrays(files, label_key):
    images, labels = [], []
    for path in files:
        batch = _unpickle_latin1(path)
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


@register_dataset(name="cifar10", num_classes=10, img_size=(32, 32, 3), mean=(0.4914, 0.4822, 0.4465),
                  std=(0.247, 0.243, 0.261), random_flip=True, marker="cifar-10-batches-py/data_batch_1",
                  how_to_get="--download True, or put the official cifar-10-batches-py/ folder there")
def read_cifar10(folder, train):
    root = folder / "cifar-10-batches-py"
    files = [root / f"data_batch_{i}" for i in range(1, 6)] if train else [root / "test_batch"]
    images, labels = _cifar_arrays(files, "labels")
    return labels, images.__getitem__


@register_dataset(name="cifar100", num_classes=100, img_size=(32, 32, 3), mean=(0.5071, 0.4865, 0.4409),
                  std=(0.2673, 0.2564, 0.2762), random_flip=False, marker="cifar-100-python/train",
                  how_to_get="--download, or the official cifar-100-python.tar.gz unpacked there")
def read_cifar100(folder, train):
    images, labels = _cifar_arrays([folder / "cifar-100-python" / ("train" if train else "test")], "fine_labels")
    return labels, images.__getitem__


def read_image(path, size):
    """The image at `path` as uint8 (H, W, C) at `size` (H, W, C): RGB, or greyscale when C is 1."""
    with Image.open(path) as image:
        image = image.convert("L" if size[2] == 1 else "RGB")
        if image.size != (size[1], size[0]):
            # torchvision's Resize on a PIL image is PIL's bilinear resize
            image = image.resize((size[1], size[0]), Image.BILINEAR)
        pixels = np.asarray(image, dtype=np.uint8)
        return pixels[..., None] if pixels.ndim == 2 else pixels


def _lazy_files(paths, labels, size):
    """Labels now, pixels only for the indices asked for (a defense needs few training images)."""
    def read_images(indices):
        if len(indices) == 0:
            return np.zeros((0, *size), dtype=np.uint8)
        return np.stack([read_image(paths[i], size) for i in indices])
    return np.asarray(labels, dtype=np.int64), read_images


def _gtsrb_csv_rows(csv_path):
    with open(csv_path, newline="") as handle:
        rows = list(csv.reader(handle, delimiter=";"))
    return rows[1:]  # header: Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId


@register_dataset(name="gtsrb", num_classes=43, img_size=(32, 32, 3), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                  random_flip=False, marker="Train/00000/GT-00000.csv",
                  how_to_get="the GTSRB training and final-test sets unpacked there (Train/, Test/GT-final_test.csv)")
def read_gtsrb(folder, train):
    paths, labels = [], []
    if train:
        for label in range(43):
            class_dir = folder / "Train" / f"{label:05d}"
            for row in _gtsrb_csv_rows(class_dir / f"GT-{label:05d}.csv"):
                paths.append(class_dir / row[0])
                labels.append(int(row[7]))
    else:
        test_csv = folder / "Test" / "GT-final_test.csv"
        if not test_csv.is_file():
            raise UserError(f"GTSRB test labels not found: expected {test_csv}")
        for row in _gtsrb_csv_rows(test_csv):
            paths.append(folder / "Test" / row[0])
            labels.append(int(row[7]))
    return _lazy_files(paths, labels, (32, 32, 3))


def image_folder_samples(root):
    """(paths, labels) in torchvision ImageFolder order: classes sorted; per class sorted(os.walk), files sorted."""
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = [p for p in (root / name).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        for path in sorted(files, key=lambda p: (str(p.parent), p.name)):
            paths.append(path)
            labels.append(label)
    return paths, labels


@register_dataset(name="tiny", num_classes=200, img_size=(64, 64, 3), mean=(0.4802, 0.4481, 0.3975),
                  std=(0.2302, 0.2265, 0.2262), random_flip=False, marker="tiny-imagenet-200/train",
                  how_to_get="tiny-imagenet-200 unpacked there, with val/ arranged in class folders")
def read_tiny(folder, train):
    root = folder / "tiny-imagenet-200" / ("train" if train else "val")
    if not root.is_dir():
        raise UserError(f"Tiny-ImageNet split not found: expected {root}")
    if not train and (root / "val_annotations.txt").is_file() and (root / "images").is_dir():
        raise UserError(f"{root} is in the raw download layout (images/ + val_annotations.txt); BackdoorBench reads "
                        "val/ as class folders: move each image into val/<wnid>/ first")
    return _lazy_files(*image_folder_samples(root), (64, 64, 3))


def _read_idx(path):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _mnist_file(raw, stem):
    for candidate in (raw / stem, raw / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise UserError(f"MNIST file not found: expected {raw / stem}")


@register_dataset(name="mnist", num_classes=10, img_size=(28, 28, 1), mean=(0.5,), std=(0.5,), random_flip=False,
                  marker="MNIST/raw", how_to_get="--download, or the four MNIST idx files in MNIST/raw/")
def read_mnist(folder, train):
    raw = folder / "MNIST" / "raw"
    prefix = "train" if train else "t10k"
    images = _read_idx(_mnist_file(raw, f"{prefix}-images-idx3-ubyte"))[..., None]
    labels = _read_idx(_mnist_file(raw, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    return labels, np.ascontiguousarray(images).__getitem__


# ---------------------------------------------------------------- the user's own data: an ImageFolder-style folder

IMAGE_FOLDER = "imagefolder"  # a record's clean_data for the user's own folder; its data_path is that folder
TEST_FOLDERS = ("test", "val")


def image_folder_classes(folder):
    """The class names of <folder>/train, sorted as torchvision's ImageFolder sorts them (label = position)."""
    train = Path(folder) / "train"
    if not train.is_dir():
        raise UserError(f"image folder {folder}: expected {train}/<class>/<image> (and test/ or val/ beside it)")
    classes = sorted(entry.name for entry in train.iterdir() if entry.is_dir())
    if not classes:
        raise UserError(f"image folder {train} holds no class folders")
    return classes


def image_folder_test_root(folder):
    for name in TEST_FOLDERS:
        if (Path(folder) / name).is_dir():
            return Path(folder) / name
    raise UserError(f"image folder {folder}: no test/ (or val/) folder of class folders beside train/")


def image_folder_split(folder, train, classes):
    """(paths, labels) of one split in ImageFolder order; the test split labelled by the training split's classes,
    so a class missing from test/ shifts no label."""
    root = Path(folder) / "train" if train else image_folder_test_root(folder)
    present = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
    unknown = [name for name in present if name not in classes]
    if unknown:
        raise UserError(f"image folder {root}: class folder {unknown[0]!r} is not among the training classes "
                        f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})")
    paths, labels = [], []
    for name in present:
        files = [p for p in (root / name).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        files.sort(key=lambda p: (str(p.parent), p.name))
        paths.extend(files)
        labels.extend([classes.index(name)] * len(files))
    if not paths:
        raise UserError(f"image folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return paths, labels


def image_folder_info(img_size, mean, std, classes, random_flip=False):
    """A DatasetInfo for the user's own folder (<folder>/train/<class>/..., <folder>/test/<class>/...), every image
    resized to `img_size` (H, W, C) as torchvision's Resize on a PIL image would."""
    img_size = tuple(int(v) for v in img_size)

    def read(folder, train):
        return _lazy_files(*image_folder_split(folder, train, list(classes)), img_size)
    return DatasetInfo(name=IMAGE_FOLDER, num_classes=len(classes), img_size=img_size, mean=tuple(mean),
                       std=tuple(std), random_flip=random_flip, marker="train", reader=read,
                       how_to_get="a folder holding train/<class>/<image> and test/<class>/<image>")


def dataset_folder(name, dataset_path="data", download=False):
    """The folder holding dataset `name`: `<dataset_path>/<name>` (BackdoorBench) or `<dataset_path>` itself."""
    info = dataset_info(name)
    base = Path(dataset_path)
    for folder in (base / name, base):
        if (folder / info.marker).exists():
            return folder
    if download:
        return download_dataset(name, base / name)
    raise UserError(f"{name} data not found: expected {base / name / info.marker}. "
                    f"Get it with: {info.how_to_get}; or point --dataset_path at the folder that holds it.")


def download_dataset(name, folder):
    """Download through torchvision, only when the user asked for it (--download)."""
    import torchvision.datasets as tv
    makers = {"cifar10": tv.CIFAR10, "cifar100": tv.CIFAR100, "mnist": tv.MNIST}
    if name not in makers:
        raise UserError(f"{name} cannot be downloaded automatically; get it with: {dataset_info(name).how_to_get}")
    folder.mkdir(parents=True, exist_ok=True)
    for train in (True, False):
        makers[name](str(folder), train=train, download=True)
    return folder


class CleanSplit:
    """One split of a clean dataset: all labels in memory, images decoded on request."""

    def __init__(self, name, dataset_path="data", train=True, download=False, info=None):
        """`info`: the user's own folder (image_folder_info), read from `dataset_path` itself."""
        self.info = info or dataset_info(name)
        if info is not None and info.name == IMAGE_FOLDER:
            self.folder = Path(dataset_path)
            image_folder_classes(self.folder)  # the layout is there, or one clear error
        else:
            self.folder = dataset_folder(name, dataset_path, download)
        self.train = train
        with _readable(self):
            self.labels, self._read_images = self.info.reader(self.folder, train)

    def __len__(self):
        return len(self.labels)

    def images(self, indices=None):
        """uint8 array (N, H, W, C) of the samples at `indices` (all when None), in that order."""
        indices = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)
        outside = indices[(indices < 0) | (indices >= len(self))]
        if len(outside):
            raise UserError(f"{self.info.name} {'train' if self.train else 'test'} split has {len(self)} samples; "
                            f"index {int(outside[0])} is out of range")
        with _readable(self):
            return self._read_images(indices)


class _readable:
    """Turns low-level read failures of a dataset into one clear UserError."""

    def __init__(self, split):
        self.split = split

    def __enter__(self):
        return self

    def __exit__(self, kind, err, trace):
        # a corrupt file surfaces as almost any exception (TypeError, LookupError, MemoryError, ... from unpickling)
        if isinstance(err, Exception) and not isinstance(err, UserError):
            raise UserError(f"cannot read {self.split.info.name} from {self.split.folder}: "
                            f"{type(err).__name__}: {err}") from None
        return False
