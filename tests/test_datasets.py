"""utils/datasets.py: every registered dataset read from a tiny on-disk fixture in its real layout, in the index order
BackdoorBench's reader gives (record indices point into exactly that order), with the pixels that were written."""
import gzip
import pickle
import shutil
import struct

import numpy as np
import pytest
from PIL import Image

from utils import datasets
from utils.datasets import DATASETS, CleanSplit, dataset_folder, dataset_info
from utils.errors import UserError

RNG_SEED = 1234


# ---------------------------------------------------------------- fixture writers (one per registered dataset)

class Written:
    """What a fixture writer put on disk: per split the labels and pixels in reference order."""

    def __init__(self, folder):
        self.folder = folder
        self.labels = {}  # train(bool) -> int64 array
        self.pixels = {}  # train(bool) -> uint8 NHWC array, or None where the format is lossy (JPEG)
        self.test_split_files = []  # deleting these removes the test split (and nothing else)
        self.corruptible = None  # one data file whose corruption must surface as UserError


def _pickle_cifar(path, data, labels, label_key, protocol):
    batch = {"batch_label": "fixture", label_key: [int(x) for x in labels], "data": data,
             "filenames": [f"img_{i}.png" for i in range(len(labels))]}
    if label_key == "fine_labels":
        batch["coarse_labels"] = [int(x) % 20 for x in labels]  # present in the real file; must not be used
    with open(path, "wb") as handle:
        pickle.dump(batch, handle, protocol=protocol)


def write_cifar10(folder, rng, protocol=2):
    written = Written(folder)
    root = folder / "cifar-10-batches-py"
    root.mkdir(parents=True)
    sizes = {f"data_batch_{i}": n for i, n in zip(range(1, 6), (3, 1, 4, 2, 3))}
    sizes["test_batch"] = 5
    arrays = {}
    for file, n in sizes.items():
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n)
        _pickle_cifar(root / file, data, labels, "labels", protocol)
        arrays[file] = (data, labels)
    for train, files in ((True, [f"data_batch_{i}" for i in range(1, 6)]), (False, ["test_batch"])):
        written.pixels[train] = np.concatenate([arrays[f][0] for f in files]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        written.labels[train] = np.concatenate([arrays[f][1] for f in files]).astype(np.int64)
    written.test_split_files = [root / "test_batch"]
    written.corruptible = root / "data_batch_3"
    return written


def write_cifar100(folder, rng, protocol=2):
    written = Written(folder)
    root = folder / "cifar-100-python"
    root.mkdir(parents=True)
    for train, file, n in ((True, "train", 7), (False, "test", 4)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 100, size=n)
        labels[0] = 99
        _pickle_cifar(root / file, data, labels, "fine_labels", protocol)
        written.pixels[train] = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        written.labels[train] = labels.astype(np.int64)
    written.test_split_files = [root / "test"]
    written.corruptible = root / "train"
    return written


GTSRB_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"


def _gtsrb_expected(image):
    """BackdoorBench's transform: torchvision Resize((32, 32)) on the PIL image."""
    import torchvision.transforms as T
    return np.asarray(T.Resize((32, 32))(Image.fromarray(image)), dtype=np.uint8)


def write_gtsrb(folder, rng):
    written = Written(folder)
    # rows per class; the rest of the 43 classes have a CSV with a header only; file names deliberately out of
    # sorted order so that CSV order (not directory order) is what is tested; sizes (W, H) mostly not 32x32
    rows = {0: [("00001_00002.ppm", (32, 32)), ("00000_00000.ppm", (35, 41))],
            5: [("00000_00001.ppm", (40, 33))],
            42: [("00003_00000.ppm", (32, 32)), ("00001_00000.ppm", (29, 31)), ("00002_00005.ppm", (50, 50))]}
    labels, pixels = [], []
    for label in range(43):
        class_dir = folder / "Train" / f"{label:05d}"
        class_dir.mkdir(parents=True)
        lines = [GTSRB_HEADER]
        for file, (w, h) in rows.get(label, []):
            image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            Image.fromarray(image).save(class_dir / file)
            lines.append(f"{file};{w};{h};5;5;{w - 5};{h - 5};{label}")
            labels.append(label)
            pixels.append(_gtsrb_expected(image))
        (class_dir / f"GT-{label:05d}.csv").write_text("\r\n".join(lines) + "\r\n")  # the official files use CRLF
    written.labels[True], written.pixels[True] = np.array(labels, dtype=np.int64), np.stack(pixels)
    test_dir = folder / "Test"
    test_dir.mkdir()
    lines, labels, pixels = [GTSRB_HEADER], [], []
    for file, label, (w, h) in (("00002.ppm", 17, (32, 32)), ("00000.ppm", 3, (45, 38)), ("00001.ppm", 40, (30, 36))):
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(image).save(test_dir / file)
        lines.append(f"{file};{w};{h};5;5;{w - 5};{h - 5};{label}")
        labels.append(label)
        pixels.append(_gtsrb_expected(image))
    (test_dir / "GT-final_test.csv").write_text("\r\n".join(lines) + "\r\n")
    written.labels[False], written.pixels[False] = np.array(labels, dtype=np.int64), np.stack(pixels)
    written.test_split_files = [test_dir / "GT-final_test.csv"]
    written.corruptible = folder / "Train" / "00005" / "00000_00001.ppm"
    return written


TINY_WNIDS = ("n09193705", "n01443537", "n02124075")  # created out of sorted order


def write_tiny(folder, rng):
    """train/<wnid>/images/*.JPEG (+ the boxes file the download has), val/<wnid>/*.JPEG as class folders.
    One lossless PNG per class and one greyscale JPEG check decoding; the reference order comes from ImageFolder."""
    written = Written(folder)
    root = folder / "tiny-imagenet-200"
    for train, split in ((True, "train"), (False, "val")):
        for index, wnid in enumerate(TINY_WNIDS):
            images = root / split / wnid / "images" if train else root / split / wnid
            images.mkdir(parents=True)
            count = 3 if train else 2
            for k in reversed(range(count)):
                Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(
                    images / f"{wnid}_{k}.JPEG", quality=90)
            Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(images / f"{wnid}_p.png")
            if index == 1:
                Image.fromarray(rng.integers(0, 256, size=(64, 64), dtype=np.uint8)).save(images / f"{wnid}_grey.JPEG")
            if train:
                (root / split / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t63\t63\n")
        written.pixels[train] = None  # JPEG: the test compares against ImageFolder's decoding instead
    written.labels[True] = written.labels[False] = None  # filled from ImageFolder in the tests
    (root / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    written.test_split_files = [root / "val"]
    written.corruptible = root / "train" / TINY_WNIDS[0] / "images" / f"{TINY_WNIDS[0]}_1.JPEG"
    return written


def _idx_bytes(array, magic_type=0x08):
    header = struct.pack(">BBBB", 0, 0, magic_type, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_mnist(folder, rng, gz=False):
    written = Written(folder)
    raw = folder / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for train, prefix, n in ((True, "train", 9), (False, "t10k", 4)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        for stem, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            data = _idx_bytes(array)
            if gz:
                with gzip.open(raw / f"{stem}.gz", "wb") as handle:
                    handle.write(data)
            else:
                (raw / stem).write_bytes(data)
        written.pixels[train] = images[..., None]
        written.labels[train] = labels.astype(np.int64)
    suffix = ".gz" if gz else ""
    written.test_split_files = [raw / f"t10k-images-idx3-ubyte{suffix}", raw / f"t10k-labels-idx1-ubyte{suffix}"]
    written.corruptible = raw / f"train-images-idx3-ubyte{suffix}"
    return written


WRITERS = {"cifar10": write_cifar10, "cifar100": write_cifar100, "gtsrb": write_gtsrb, "tiny": write_tiny,
           "mnist": write_mnist}


def write_fixture(name, folder, **options):
    if name not in WRITERS:
        pytest.fail(f"dataset {name!r} is registered in utils.datasets.DATASETS but tests/test_datasets.py has no "
                    f"fixture writer for it: add one to WRITERS")
    folder.mkdir(parents=True, exist_ok=True)
    written = WRITERS[name](folder, np.random.default_rng(RNG_SEED), **options)
    if name == "tiny":
        _fill_tiny_reference(written)
    return written


def _fill_tiny_reference(written):
    from torchvision.datasets import ImageFolder
    for train, split in ((True, "train"), (False, "val")):
        reference = ImageFolder(str(written.folder / "tiny-imagenet-200" / split))
        written.labels[train] = np.array(reference.targets, dtype=np.int64)
        written.pixels[train] = np.stack([np.asarray(reference[i][0], dtype=np.uint8) for i in range(len(reference))])


ALL = sorted(DATASETS)


# ---------------------------------------------------------------- registry

def test_every_registered_dataset_has_a_fixture_writer():
    missing = sorted(set(DATASETS) - set(WRITERS))
    assert not missing, f"no fixture writer in tests/test_datasets.py for registered datasets: {missing}"
    assert {"cifar10", "cifar100", "gtsrb", "tiny", "mnist"} <= set(DATASETS)


@pytest.mark.parametrize("name, num_classes, img_size, mean, std, flip", [
    ("cifar10", 10, (32, 32, 3), (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261), True),
    ("cifar100", 100, (32, 32, 3), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), False),
    ("gtsrb", 43, (32, 32, 3), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), False),
    ("tiny", 200, (64, 64, 3), (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262), False),
    ("mnist", 10, (28, 28, 1), (0.5,), (0.5,), False),
])
def test_dataset_info_matches_backdoorbench(name, num_classes, img_size, mean, std, flip):
    info = dataset_info(name)
    assert info.name == name
    assert info.num_classes == num_classes
    assert tuple(info.img_size) == img_size
    assert info.mean == pytest.approx(mean) and info.std == pytest.approx(std)
    assert len(info.mean) == len(info.std) == img_size[2]
    assert info.random_flip is flip


def test_unknown_dataset_is_a_user_error_listing_the_known_ones(tmp_path):
    with pytest.raises(UserError) as err:
        dataset_info("imagenet")
    assert "imagenet" in str(err.value) and all(name in str(err.value) for name in DATASETS)
    with pytest.raises(UserError):
        CleanSplit("imagenet", tmp_path)


# ---------------------------------------------------------------- every dataset: order, pixels, paths, errors

@pytest.mark.parametrize("train", [True, False], ids=["train", "test"])
@pytest.mark.parametrize("name", ALL)
def test_labels_and_pixels_in_reference_order(tmp_path, name, train):
    written = write_fixture(name, tmp_path / name)
    split = CleanSplit(name, tmp_path, train=train)
    expected_labels, expected_pixels = written.labels[train], written.pixels[train]
    info = dataset_info(name)

    assert split.labels.dtype == np.int64
    np.testing.assert_array_equal(split.labels, expected_labels)
    assert len(split) == len(expected_labels) > 0
    assert split.labels.min() >= 0 and split.labels.max() < info.num_classes

    everything = split.images()
    assert everything.dtype == np.uint8
    assert everything.shape == (len(expected_labels), *info.img_size)
    np.testing.assert_array_equal(everything, expected_pixels)

    # any order, repeats included, comes back in the order asked for
    order = np.array([len(split) - 1, 0, len(split) - 1] + list(range(len(split) // 2)))
    np.testing.assert_array_equal(split.images(order), expected_pixels[order])
    np.testing.assert_array_equal(split.images(list(order)), expected_pixels[order])
    assert split.images([]).shape == (0, *info.img_size)
    assert split.images(np.array([], dtype=np.int64)).dtype == np.uint8


@pytest.mark.parametrize("name", ALL)
def test_dataset_path_is_the_parent_or_the_dataset_folder_itself(tmp_path, name):
    # BackdoorBench layout: --dataset_path data  ->  data/<name>/...
    written = write_fixture(name, tmp_path / "data" / name)
    assert dataset_folder(name, tmp_path / "data") == tmp_path / "data" / name
    assert dataset_folder(name, str(tmp_path / "data")) == tmp_path / "data" / name
    # --dataset_path pointing straight at the dataset folder, whatever it is called
    elsewhere = tmp_path / "elsewhere" / "my_copy"
    shutil.copytree(written.folder, elsewhere)
    assert dataset_folder(name, elsewhere) == elsewhere
    for path in (tmp_path / "data", elsewhere):
        split = CleanSplit(name, path, train=True)
        np.testing.assert_array_equal(split.labels, written.labels[True])
        np.testing.assert_array_equal(split.images([0]), written.pixels[True][:1])


@pytest.mark.parametrize("name", ALL)
def test_missing_data_is_a_user_error_naming_the_expected_path_and_nothing_is_downloaded(tmp_path, monkeypatch, name):
    def no_download(*args, **kwargs):
        raise AssertionError("download attempted without --download")
    monkeypatch.setattr(datasets, "download_dataset", no_download)
    (tmp_path / "unrelated").mkdir()
    before = sorted(tmp_path.rglob("*"))
    for call in (lambda: CleanSplit(name, tmp_path), lambda: CleanSplit(name, tmp_path, train=False),
                 lambda: dataset_folder(name, tmp_path)):
        with pytest.raises(UserError) as err:
            call()
        message = str(err.value)
        assert str(tmp_path / name / dataset_info(name).marker) in message
        assert "--dataset_path" in message
    assert sorted(tmp_path.rglob("*")) == before  # nothing created


@pytest.mark.parametrize("name", ALL)
def test_missing_test_split_is_a_user_error_naming_the_path(tmp_path, name):
    written = write_fixture(name, tmp_path / name)
    for path in written.test_split_files:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert len(CleanSplit(name, tmp_path, train=True)) == len(written.labels[True])  # train still reads
    with pytest.raises(UserError) as err:
        CleanSplit(name, tmp_path, train=False).images()
    assert any(str(path) in str(err.value) for path in written.test_split_files), str(err.value)


@pytest.mark.parametrize("name", ALL)
def test_corrupt_file_is_a_user_error(tmp_path, name):
    written = write_fixture(name, tmp_path / name)
    written.corruptible.write_bytes(b"this is not the file you are looking for" * 3)
    with pytest.raises(UserError) as err:
        CleanSplit(name, tmp_path, train=True).images()
    assert name in str(err.value)


# numpy may report an "Exception ignored" while freeing a half-built array of a damaged pickle: not our error
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("name, file, gz", [
    ("cifar10", "cifar-10-batches-py/test_batch", False),
    ("cifar100", "cifar-100-python/test", False),
    ("mnist", "MNIST/raw/t10k-images-idx3-ubyte", False),
    ("mnist", "MNIST/raw/t10k-images-idx3-ubyte.gz", True),
])
def test_any_damage_to_a_data_file_is_a_user_error(tmp_path, name, file, gz):
    """Truncated or bit-flipped files fail in many ways inside pickle/numpy/gzip (TypeError, LookupError,
    zlib.error, OverflowError, ...): every one must end as a UserError, never a traceback."""
    options = {"gz": gz} if name == "mnist" else {}
    write_fixture(name, tmp_path / name, **options)
    path = tmp_path / name / file
    original = path.read_bytes()
    rng = np.random.default_rng(7)
    damaged = [original[:cut] for cut in (0, 1, 2, 5, 17, 60, len(original) // 2, len(original) - 1)]
    for _ in range(150):
        data = bytearray(original)
        for position in rng.integers(0, min(len(data), 300), size=rng.integers(1, 4)):
            data[position] = int(rng.integers(0, 256))
        damaged.append(bytes(data))
    escaped = []
    for data in damaged:
        path.write_bytes(data)
        try:
            CleanSplit(name, tmp_path, train=False).images()
        except UserError:
            pass
        except Exception as err:  # noqa: BLE001 - the point is to catch everything else
            escaped.append(f"{type(err).__name__}: {err}")
    assert not escaped, escaped[:5]


@pytest.mark.parametrize("content", [[1, 2, 3], {"data": "not pixels", "labels": [0]}, {"labels": [0, 1]}, None])
def test_cifar_pickle_of_the_wrong_thing_is_a_user_error(tmp_path, content):
    write_fixture("cifar10", tmp_path / "cifar10")
    with open(tmp_path / "cifar10" / "cifar-10-batches-py" / "test_batch", "wb") as handle:
        pickle.dump(content, handle, protocol=2)
    with pytest.raises(UserError) as err:
        CleanSplit("cifar10", tmp_path, train=False).images()
    assert str(tmp_path / "cifar10") in str(err.value)


@pytest.mark.parametrize("name", ALL)
def test_out_of_range_indices_are_user_errors(tmp_path, name):
    write_fixture(name, tmp_path / name)
    split = CleanSplit(name, tmp_path, train=False)
    n = len(split)
    for bad in ([n], [0, n + 5], [-1], [1, -3]):
        with pytest.raises(UserError) as err:
            split.images(bad)
        message = str(err.value)
        assert str(n) in message
        offending = [i for i in bad if i < 0 or i >= n][0]
        assert f"index {offending} " in message, message
    np.testing.assert_array_equal(split.images([n - 1]), split.images()[-1:])


# ---------------------------------------------------------------- per-format details

@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickles_of_any_protocol_read_like_a_direct_pickle_load(tmp_path, name, protocol):
    """torchvision's CIFAR classes check md5 sums, so the reference is a plain pickle.load of the same files.
    The official files are Python 2 pickles; a copy re-pickled by Python 3 (protocol 5) must read the same."""
    written = write_fixture(name, tmp_path / name, protocol=protocol)
    if name == "cifar10":
        root = written.folder / "cifar-10-batches-py"
        files, key = {True: [root / f"data_batch_{i}" for i in range(1, 6)], False: [root / "test_batch"]}, "labels"
    else:
        root = written.folder / "cifar-100-python"
        files, key = {True: [root / "train"], False: [root / "test"]}, "fine_labels"
    for train in (True, False):
        batches = []
        for path in files[train]:
            with open(path, "rb") as handle:
                batches.append(pickle.load(handle, encoding="latin1"))
        reference_labels = np.concatenate([np.asarray(b[key]) for b in batches])
        reference_pixels = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        split = CleanSplit(name, tmp_path, train=train)
        np.testing.assert_array_equal(split.labels, reference_labels)
        np.testing.assert_array_equal(split.images(), reference_pixels)
    if name == "cifar100":  # fine labels, not the coarse ones
        assert CleanSplit(name, tmp_path).labels.max() == 99


def test_cifar_pickle_with_a_foreign_global_is_refused(tmp_path):
    import os
    write_fixture("cifar10", tmp_path / "cifar10")

    class Evil:
        def __reduce__(self):
            return os.system, ("echo pwned",)

    with open(tmp_path / "cifar10" / "cifar-10-batches-py" / "test_batch", "wb") as handle:
        pickle.dump({"data": Evil(), "labels": []}, handle, protocol=2)
    with pytest.raises(UserError) as err:
        CleanSplit("cifar10", tmp_path, train=False)
    assert "os.system" in str(err.value) or "posix.system" in str(err.value)


def test_gtsrb_rows_in_csv_order_class_by_class_resized_bilinear(tmp_path):
    written = write_fixture("gtsrb", tmp_path / "gtsrb")
    split = CleanSplit("gtsrb", tmp_path)
    # classes 0, 5, 42 hold rows; all other class folders have header-only CSVs
    assert split.labels.tolist() == [0, 0, 5, 42, 42, 42]
    images = split.images()
    assert images.shape == (6, 32, 32, 3)
    # row 0 is a 32x32 image: no resize, exact pixels as written
    with Image.open(written.folder / "Train" / "00000" / "00001_00002.ppm") as image:
        np.testing.assert_array_equal(images[0], np.asarray(image))
    # row 1 was 35x41: torchvision Resize((32, 32)) (PIL bilinear) of the original
    np.testing.assert_array_equal(images[1], written.pixels[True][1])
    test = CleanSplit("gtsrb", tmp_path, train=False)
    assert test.labels.tolist() == [17, 3, 40]
    assert test.images([1]).shape == (1, 32, 32, 3)


def test_gtsrb_missing_class_csv_is_a_user_error_naming_it(tmp_path):
    write_fixture("gtsrb", tmp_path / "gtsrb")
    missing = tmp_path / "gtsrb" / "Train" / "00017" / "GT-00017.csv"
    missing.unlink()
    with pytest.raises(UserError) as err:
        CleanSplit("gtsrb", tmp_path)
    assert str(missing) in str(err.value)


def test_gtsrb_missing_image_named_by_csv_is_a_user_error(tmp_path):
    write_fixture("gtsrb", tmp_path / "gtsrb")
    image = tmp_path / "gtsrb" / "Train" / "00042" / "00001_00000.ppm"
    image.unlink()
    split = CleanSplit("gtsrb", tmp_path)
    split.images([0, 1, 2, 3])  # the other images still read: pixels are decoded on request only
    with pytest.raises(UserError) as err:
        split.images([4])
    assert str(image) in str(err.value)


@pytest.mark.parametrize("train, split_name", [(True, "train"), (False, "val")])
def test_tiny_matches_torchvision_imagefolder(tmp_path, train, split_name):
    from torchvision.datasets import ImageFolder
    write_fixture("tiny", tmp_path / "tiny")
    reference = ImageFolder(str(tmp_path / "tiny" / "tiny-imagenet-200" / split_name))
    assert reference.classes == sorted(TINY_WNIDS)
    split = CleanSplit("tiny", tmp_path, train=train)
    assert split.labels.tolist() == reference.targets
    # same files in the same order (the paths the reader would decode)
    paths, labels = datasets.image_folder_samples(tmp_path / "tiny" / "tiny-imagenet-200" / split_name)
    assert [str(p) for p in paths] == [path for path, _ in reference.samples]
    assert labels == reference.targets
    images = split.images()
    assert images.shape == (len(reference), 64, 64, 3)
    for i in range(len(reference)):
        np.testing.assert_array_equal(images[i], np.asarray(reference[i][0]))
    # lossless PNGs: pixels exactly as written
    png = [i for i, (path, _) in enumerate(reference.samples) if path.endswith(".png")]
    assert len(png) == len(TINY_WNIDS)
    for i in png:
        with Image.open(reference.samples[i][0]) as image:
            np.testing.assert_array_equal(images[i], np.asarray(image.convert("RGB")))


def test_tiny_train_order_with_files_at_several_depths(tmp_path):
    """ImageFolder walks sorted(os.walk(class_dir)): files directly in the class folder come before images/,
    and sibling folders sort as strings ('a-b' before 'a/...')."""
    from torchvision.datasets import ImageFolder
    write_fixture("tiny", tmp_path / "tiny")
    cls = tmp_path / "tiny" / "tiny-imagenet-200" / "train" / TINY_WNIDS[1]
    for relative in ("z_top.png", "a/deep/x.png", "a-b/y.png", "a/w.png", "B/v.png"):
        (cls / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((64, 64, 3), len(relative), dtype=np.uint8)).save(cls / relative)
    reference = ImageFolder(str(tmp_path / "tiny" / "tiny-imagenet-200" / "train"))
    paths, labels = datasets.image_folder_samples(tmp_path / "tiny" / "tiny-imagenet-200" / "train")
    assert [str(p) for p in paths] == [path for path, _ in reference.samples]
    split = CleanSplit("tiny", tmp_path)
    np.testing.assert_array_equal(split.labels, reference.targets)


class _Listing:
    """What os.scandir returns (iterable, context manager), over a fixed list of entries."""

    def __init__(self, entries):
        self.entries = entries

    def __iter__(self):
        return iter(self.entries)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def close(self):
        pass


def test_tiny_order_does_not_depend_on_the_directory_listing_order(tmp_path, monkeypatch):
    """The file system lists entries in no particular order (on ext4 it can happen to be sorted, which hides a
    missing sort): list every directory in reverse order and the reader must still give ImageFolder's order."""
    import os
    from torchvision.datasets import ImageFolder
    write_fixture("tiny", tmp_path / "tiny")
    train = tmp_path / "tiny" / "tiny-imagenet-200" / "train"
    for wnid in ("n03000000", "n00000001", "n05000000"):
        (train / wnid / "images").mkdir(parents=True)
        for k in (2, 0, 1):
            Image.fromarray(np.full((64, 64, 3), k, dtype=np.uint8)).save(train / wnid / "images" / f"{wnid}_{k}.png")
    reference = ImageFolder(str(train))  # before the listing is reversed

    real_listdir, real_scandir = os.listdir, os.scandir

    def reversed_listdir(path="."):
        return sorted(real_listdir(path), reverse=True)

    def reversed_scandir(path="."):
        with real_scandir(path) as entries:
            return _Listing(sorted(entries, key=lambda entry: entry.name, reverse=True))

    monkeypatch.setattr(os, "listdir", reversed_listdir)
    monkeypatch.setattr(os, "scandir", reversed_scandir)
    paths, labels = datasets.image_folder_samples(train)
    assert [str(p) for p in paths] == [path for path, _ in reference.samples]
    assert labels == reference.targets
    np.testing.assert_array_equal(CleanSplit("tiny", tmp_path).labels, reference.targets)


def test_tiny_raw_val_layout_is_refused_clearly(tmp_path):
    write_fixture("tiny", tmp_path / "tiny")
    val = tmp_path / "tiny" / "tiny-imagenet-200" / "val"
    shutil.rmtree(val)
    (val / "images").mkdir(parents=True)
    lines = []
    for k, wnid in enumerate(TINY_WNIDS):
        Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(val / "images" / f"val_{k}.JPEG")
        lines.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t63\t63")
    (val / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    assert len(CleanSplit("tiny", tmp_path, train=True)) > 0
    with pytest.raises(UserError) as err:
        CleanSplit("tiny", tmp_path, train=False)
    message = str(err.value)
    assert "val_annotations.txt" in message and str(val) in message and "class folders" in message


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_mnist_idx_files_plain_and_gzipped(tmp_path, gz):
    written = write_fixture("mnist", tmp_path / "mnist", gz=gz)
    for train in (True, False):
        split = CleanSplit("mnist", tmp_path, train=train)
        np.testing.assert_array_equal(split.labels, written.labels[train])
        images = split.images()
        assert images.shape == (len(written.labels[train]), 28, 28, 1)
        np.testing.assert_array_equal(images, written.pixels[train])


def test_mnist_matches_torchvision_reader(tmp_path):
    """torchvision's MNIST only checks that the uncompressed raw files exist (no md5), so it is the reference."""
    from torchvision.datasets import MNIST
    write_fixture("mnist", tmp_path / "mnist")
    for train in (True, False):
        reference = MNIST(str(tmp_path / "mnist"), train=train, download=False)
        split = CleanSplit("mnist", tmp_path, train=train)
        np.testing.assert_array_equal(split.labels, reference.targets.numpy())
        np.testing.assert_array_equal(split.images()[..., 0], reference.data.numpy())


@pytest.mark.parametrize("name", ["gtsrb", "tiny"])
def test_download_is_refused_for_datasets_torchvision_cannot_fetch(tmp_path, name):
    with pytest.raises(UserError) as err:
        CleanSplit(name, tmp_path, download=True)
    assert "cannot be downloaded" in str(err.value)


# ---------------------------------------------------------------- the real prepared CIFAR-10

def test_real_cifar10_sizes_and_labels_match_the_pickles(cifar10_dir):
    root = cifar10_dir / "cifar-10-batches-py"
    for train, files, n in ((True, [f"data_batch_{i}" for i in range(1, 6)], 50000), (False, ["test_batch"], 10000)):
        batches = []
        for file in files:
            with open(root / file, "rb") as handle:
                batches.append(pickle.load(handle, encoding="latin1"))
        labels = np.concatenate([np.asarray(b["labels"]) for b in batches])
        split = CleanSplit("cifar10", cifar10_dir.parent, train=train)
        assert len(split) == n == len(labels)
        np.testing.assert_array_equal(split.labels, labels)
        assert np.bincount(split.labels, minlength=10).tolist() == [n // 10] * 10
        some = np.array([0, 9999, n - 1, 12345 % n, 3])
        data = np.concatenate([b["data"] for b in batches])
        np.testing.assert_array_equal(split.images(some), data[some].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    # the same folder found both ways
    assert dataset_folder("cifar10", cifar10_dir) == cifar10_dir
    assert dataset_folder("cifar10", cifar10_dir.parent) == cifar10_dir
