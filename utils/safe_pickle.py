"""Reading torch/pickle files without running code from them: unpickling restricted to an explicit allow-list.

BackdoorBench records hold only builtins, OrderedDict, torch tensors and numpy arrays/scalars (pickled under
`numpy.core.multiarray` by numpy 1 and `numpy._core.multiarray` by numpy 2). Any other global, such as the PIL
images inside v1 records or a crafted `os.system`, is refused before it is imported or called.
This works the same on every torch from 2.1 on (torch's own weights_only allow-list is extensible only from 2.4).
"""
import codecs
import collections
import contextlib
import importlib
import io
import pickle
import stat
import types
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch._utils

from utils.errors import UserError, summarise_error


def _numpy_module(name):
    """numpy._core.<name> (numpy 2) or numpy.core.<name> (numpy 1)."""
    for qualified in (f"numpy._core.{name}", f"numpy.core.{name}"):
        try:
            return importlib.import_module(qualified)
        except ImportError:
            continue
    raise ImportError(f"numpy module {name} not found")


def _allowed_globals():
    multiarray = _numpy_module("multiarray")
    allowed = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("_codecs", "encode"): codecs.encode,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
        ("torch", "Size"): torch.Size,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    # pickle protocol 5 (Python 3's default, e.g. a re-saved CIFAR batch) stores arrays through numpy's _frombuffer
    numeric = _numpy_module("numeric")
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(module, "_frombuffer")] = numeric._frombuffer
    # numpy >= 1.25 may name the per-type dtype classes (numpy.dtypes.Float64DType, ...)
    dtype_classes = getattr(np, "dtypes", None)
    if dtype_classes is not None:
        for name in dir(dtype_classes):
            if name.endswith("DType"):
                allowed[("numpy.dtypes", name)] = getattr(dtype_classes, name)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                  torch.int16, torch.int8, torch.uint8, torch.bool):
        allowed[("torch", str(dtype).split(".")[-1])] = dtype
    return allowed


ALLOWED_GLOBALS = _allowed_globals()


class ForbiddenGlobal(pickle.UnpicklingError):
    """The file names a global outside the allow-list; `.name` is its dotted name."""

    def __init__(self, name):
        super().__init__(f"refused to load global {name}")
        self.name = name


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise ForbiddenGlobal(f"{module}.{name}") from None


def _restricted_load(file, **kwargs):
    return RestrictedUnpickler(file, **kwargs).load()


# torch.load(pickle_module=...) needs a module-like object with Unpickler and load.
restricted_pickle_module = types.ModuleType("restricted_pickle")
restricted_pickle_module.Unpickler = RestrictedUnpickler
restricted_pickle_module.load = _restricted_load
restricted_pickle_module.__dict__["Pickler"] = pickle.Pickler


MAX_FILE_BYTES = 2 << 30  # no record or side pickle comes near this; a link to /dev/zero would never end
_ZIP_MAGIC = b"PK\x03\x04"  # what torch.load tests to take its zip path (torch.serialization._is_zipfile)


def read_bounded(path, max_bytes=MAX_FILE_BYTES):
    """The bytes of the regular file `path` (links followed), refused past `max_bytes`."""
    path = Path(path)
    try:
        status = path.stat()
    except FileNotFoundError:
        raise UserError(f"file not found: {path}") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({err.strerror or err})") from None
    if not stat.S_ISREG(status.st_mode):
        raise UserError(f"{path}: not a regular file (a device, pipe or folder), not loaded")
    with open(path, "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UserError(f"{path}: larger than {max_bytes >> 20} MiB, not loaded")
    return data


def _torch_zip_records(data):
    """The entry names torch's own zip reader sees in `data` (the reader torch.load uses)."""
    opener = getattr(torch.serialization, "_open_zipfile_reader", None)
    if opener is not None:
        with opener(io.BytesIO(data)) as reader:
            return list(reader.get_all_records())
    return list(torch._C.PyTorchFileReader(io.BytesIO(data)).get_all_records())


def check_torch_archive(data, path, trust_option="--trust_record"):
    """Refuse, before torch.load sees them, the bytes that torch would hand to torch.jit.load (a TorchScript
    archive runs its code while loading) and zip archives that Python's zipfile cannot verify (bad structure or a
    CRC that does not match: a changed byte). Whether it is TorchScript is asked of torch's own reader, so no
    second parser can disagree with the one that decides. Non-zip bytes (torch's legacy format) pass."""
    if not data.startswith(_ZIP_MAGIC):
        return
    try:
        records = _torch_zip_records(data)
    except Exception as err:  # torch refuses it: so would torch.load, say so in one line
        raise UserError(f"{path}: corrupt zip archive ({summarise_error(err)})") from None
    if any(name == "constants.pkl" for name in records):
        raise UserError(f"{path}: a TorchScript archive, whose code would run on loading (no BackdoorBench record "
                        f"is one); not loaded. Trusted? Rerun with {trust_option}.")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, NotImplementedError) as err:
        raise UserError(f"{path}: malformed zip archive ({summarise_error(err)}), not loaded") from None
    if bad is not None:
        raise UserError(f"{path}: entry {bad[:100]} fails its zip CRC check (the file was changed or damaged)")


@contextlib.contextmanager
def _torchscript_unreachable(path, trust_option):
    """Within the block torch.jit.load raises instead of running an archive: a second lock behind
    check_torch_archive, for whatever torch version dispatches to it."""
    original = torch.jit.load

    def refuse(*_args, **_kwargs):
        raise UserError(f"{path}: torch would run it as TorchScript; not loaded. Trusted? Rerun with {trust_option}.")
    torch.jit.load = refuse
    try:
        yield
    finally:
        torch.jit.load = original


def safe_torch_load(path, trust=False, trust_option="--trust_record"):
    """torch.load of `path` through the allow-list (or unrestricted if `trust`). Errors become UserError.
    The file is read once, bounded, and the bytes that are checked are the bytes that are loaded."""
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        data = read_bounded(path)
        check_torch_archive(data, path, trust_option)
        with _torchscript_unreachable(path, trust_option), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False,
                              pickle_module=restricted_pickle_module)
    except ForbiddenGlobal as err:
        if err.name.startswith("PIL."):
            why = f"it pickles PIL images ({err.name[:40]}), as v1 and in-memory v2 records do"
        else:
            why = f"it imports {err.name[:60]}, which no record needs"
        raise UserError(f"{path}: unpickling it could run code ({why}); not loaded. Trusted? Rerun with "
                        f"{trust_option}.") from None
    except FileNotFoundError:
        raise UserError(f"file not found: {path}") from None
    except UserError:
        raise
    except Exception as err:  # corrupt data surfaces as almost any exception (AssertionError, LookupError, ...)
        raise UserError(f"{path}: cannot read it as a torch file (corrupt or not a record): "
                        f"{summarise_error(err)}") from None
