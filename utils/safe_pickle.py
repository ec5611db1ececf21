"""Reading torch/pickle files without running code from them: unpickling restricted to an explicit allow-list.

BackdoorBench records hold only builtins, OrderedDict, torch tensors and numpy arrays/scalars (pickled under
`numpy.core.multiarray` by numpy 1 and `numpy._core.multiarray` by numpy 2). Any other global, such as the PIL
images inside v1 records or a crafted `os.system`, is refused before it is imported or called.
This works the same on every torch from 2.1 on (torch's own weights_only allow-list is extensible only from 2.4).
"""
import codecs
import collections
import importlib
import pickle
import types
import zipfile

import numpy as np
import torch
import torch._utils

from utils.errors import UserError


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


def _is_torchscript_archive(path):
    """Whether torch.load would hand `path` to torch.jit.load, which runs the archive's TorchScript (e.g. its
    __setstate__) without consulting the unpickler. Such archives hold a constants.pkl entry (torch's own test);
    read with Python's zipfile so the check does not depend on torch internals. Non-zip files answer False."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def safe_torch_load(path, trust=False, trust_option="--trust_record"):
    """torch.load of `path` through the allow-list (or unrestricted if `trust`). Errors become UserError."""
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        if _is_torchscript_archive(path):
            raise UserError(f"{path}: not loaded, because it is a TorchScript archive, whose code would run while "
                            f"loading; a BackdoorBench record never is one. If you trust where this file came from, "
                            f"rerun with {trust_option}.")
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=restricted_pickle_module)
    except ForbiddenGlobal as err:
        if err.name.startswith("PIL."):
            why = (f"it pickles PIL images ({err.name}), as BackdoorBench v1 records and in-memory v2 records do")
        else:
            why = f"it asks to import {err.name}, which a BackdoorBench record never needs"
        raise UserError(f"{path}: not loaded, because unpickling it could run code: {why}. "
                        f"If you trust where this file came from, rerun with {trust_option}.") from None
    except FileNotFoundError:
        raise UserError(f"file not found: {path}") from None
    except UserError:
        raise
    except Exception as err:  # corrupt data surfaces as almost any exception (AssertionError, LookupError, ...)
        raise UserError(f"{path}: cannot read it as a torch file (corrupt or not a record): {err}") from None
