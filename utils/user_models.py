"""Models that are not in the registry: the user's own constructor or a whole-model file, named in a record.

A record's `model_name` is either a registered name (utils.models) or one of
- `package.module:function` or `path/to/file.py:function`: the user's constructor, called with `num_classes` and
  `img_size` where its signature takes them (by those names), else with no arguments;
- `pickled:/path/to/model.pt`: a whole pickled model, unpickled (which runs code) to get the architecture.
Either form runs the user's code, so a defense imports it only when the user names the same model on its command
line (`--model <spec>`): a record alone never makes a defense run code.

Such models get no channels_last (a model that calls `x.view` fails on it) and a pre-hook that makes their input
contiguous, since the device batches are channels_last in memory; outputs that are already probabilities (rows
summing to 1) are turned into log-probabilities by a forward hook, so argmax and cross-entropy behave.
"""
import contextlib
import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn

from utils.errors import UserError, summarise_error
from utils.models import MODELS
from utils.safe_pickle import safe_torch_load

PICKLED = "pickled:"
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")  # where checkpoints nest them


def is_user_model(name):
    """Whether a record's model_name names the user's own model rather than a registered one."""
    return name not in MODELS and (name.startswith(PICKLED) or ":" in name)


def canonical_spec(spec):
    """The spec with a file path made absolute, so the record names the same file from any working folder."""
    if spec.startswith(PICKLED):
        return PICKLED + str(Path(spec[len(PICKLED):]).expanduser().resolve())
    if ":" not in spec:
        raise UserError(f"model {spec!r} is neither a registered model nor `module:function`, `file.py:function` "
                        f"or `pickled:FILE`; registered: {', '.join(sorted(MODELS))}")
    module, function = spec.rsplit(":", 1)
    if not module or not function.isidentifier():
        raise UserError(f"model constructor {spec!r} must read `module:function` (e.g. mynets:make_cnn)")
    if module.endswith(".py"):
        module = str(Path(module).expanduser().resolve())
    return f"{module}:{function}"


def same_model(given, recorded):
    """Whether the --model a user typed names the record's model (file paths compared resolved)."""
    if given == recorded:
        return True
    try:
        return is_user_model(given) and canonical_spec(given) == canonical_spec(recorded)
    except UserError:
        return False


def _import_constructor(spec):
    module_name, function = spec.rsplit(":", 1)
    try:
        if module_name.endswith(".py"):
            if not Path(module_name).is_file():
                raise UserError(f"model file {module_name} not found")
            module_spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            with _working_folder_importable():
                module = importlib.import_module(module_name)
    except UserError:
        raise
    except Exception as err:  # the user's module failing to import can raise anything
        raise UserError(f"cannot import {module_name} for the model constructor {spec}: {type(err).__name__}: "
                        f"{summarise_error(err)} (run from its folder, or put that folder on PYTHONPATH)") from None
    constructor = getattr(module, function, None)
    if not callable(constructor):
        raise UserError(f"{module_name} has no function or class {function} (model constructor {spec})")
    return constructor


@contextlib.contextmanager
def _working_folder_importable():
    """`python defense/x.py` puts defense/ on sys.path, not the folder the user runs it from, where their module
    usually is: that folder is searched too (last) while the constructor's module is imported."""
    added = os.getcwd() not in sys.path
    if added:
        sys.path.append(os.getcwd())
    try:
        yield
    finally:
        if added and os.getcwd() in sys.path:
            sys.path.remove(os.getcwd())


def _call_constructor(constructor, spec, num_classes, img_size):
    try:
        parameters = inspect.signature(constructor).parameters
    except (TypeError, ValueError):
        parameters = {}
    offered = {"num_classes": num_classes, "img_size": tuple(img_size)}
    kwargs = {key: value for key, value in offered.items() if key in parameters}
    try:
        model = constructor(**kwargs)
    except Exception as err:
        raise UserError(f"the model constructor {spec} failed with {sorted(kwargs) or 'no arguments'}: "
                        f"{type(err).__name__}: {summarise_error(err)}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"the model constructor {spec} returned a {type(model).__name__}, not a torch nn.Module")
    return model


def load_pickled_model(path):
    """A whole model saved with torch.save(model): unpickling runs code from the file, so only call this when the
    user asked for it explicitly."""
    model = safe_torch_load(path, trust=True)
    if not isinstance(model, nn.Module):
        raise UserError(f"{path} holds a {type(model).__name__}, not a whole model (an nn.Module); for a state_dict "
                        "give --weights and --model module:function")
    return model


def build_user_model(spec, num_classes, img_size):
    """The untrained architecture named by a user spec (its weights come from the record)."""
    spec = canonical_spec(spec)
    if spec.startswith(PICKLED):
        model = load_pickled_model(spec[len(PICKLED):])
    else:
        model = _call_constructor(_import_constructor(spec), spec, num_classes, img_size)
    model.register_forward_pre_hook(_contiguous_input)
    return model


def _contiguous_input(_module, args):
    """The device batches are channels_last in memory; a model that calls x.view(...) needs them contiguous."""
    if args and torch.is_tensor(args[0]):
        return (args[0].contiguous(),) + tuple(args[1:])
    return None


def read_state_dict(path):
    """A state_dict from a checkpoint file, through the allow-list (no code runs): a dict of tensors, or one nested
    under a usual key (state_dict, model_state_dict, model, net, weights)."""
    loaded = safe_torch_load(path, trust_option=f"--model_file {path} --trust_model_file true (or save a state_dict)")

    def is_weights(value):
        return isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values())
    if is_weights(loaded):
        return loaded
    if isinstance(loaded, dict):
        for key in STATE_DICT_KEYS:
            if is_weights(loaded.get(key)):
                return loaded[key]
    raise UserError(f"{path} holds no state_dict (a dict of tensors, or one under "
                    f"{', '.join(STATE_DICT_KEYS)}); a whole pickled model needs --model_file with --trust_model_file")


# ---------------------------------------------------------------- outputs that are probabilities

PROBABILITY_TOLERANCE = 1e-3  # float16/bfloat16 softmax rows sum to 1 within ~1e-3


def outputs_are_probabilities(outputs):
    """Whether every row is non-negative and sums to 1: a softmax at the output, not logits."""
    outputs = outputs.detach().float()
    if outputs.ndim != 2 or not bool(torch.isfinite(outputs).all()):
        return False
    sums = outputs.sum(1)
    return bool((outputs >= 0).all()) and bool(((sums - 1).abs() <= PROBABILITY_TOLERANCE).all())


def _log_of_probabilities(_module, _inputs, output):
    tiny = torch.finfo(torch.float32).tiny  # log(0) would be -inf and its gradient NaN
    return torch.log(output.float().clamp_min(tiny))


def convert_probabilities_to_log(model):
    """A forward hook that turns the model's probability rows into log-probabilities: argmax is unchanged and
    cross-entropy on them is the negative log-likelihood, as on logits. The state_dict keys stay the same."""
    model.register_forward_hook(_log_of_probabilities)
    return model


def probe_batch(img_size, count=4, seed=0):
    """A few normalised-looking random images (N, C, H, W) for the checks that need one forward pass."""
    height, width, channels = img_size
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, channels, height, width, generator=generator)


@torch.no_grad()
def check_outputs(model, num_classes, img_size, what):
    """One eval-mode forward pass of a probe batch: the output must be (N, num_classes) and finite. Returns whether
    its rows are probabilities. The model's train/eval mode is restored afterwards."""
    parameter = next(iter(model.parameters()), None)
    x = probe_batch(img_size)
    if parameter is not None:
        x = x.to(device=parameter.device, dtype=parameter.dtype)
    was_training = model.training
    model.eval()
    try:
        outputs = model(x)
    except Exception as err:  # a model that cannot take this input size fails in any layer, with any error
        raise UserError(f"{what} fails on a batch of {img_size[0]}x{img_size[1]}x{img_size[2]} images: "
                        f"{type(err).__name__}: {summarise_error(err)}") from None
    finally:
        model.train(was_training)
    if not torch.is_tensor(outputs) or tuple(outputs.shape) != (len(x), num_classes):
        shape = tuple(outputs.shape) if torch.is_tensor(outputs) else type(outputs).__name__
        raise UserError(f"{what} outputs {shape} for {len(x)} images; the defenses need (N, {num_classes}) class "
                        "scores")
    if not bool(torch.isfinite(outputs).all()):
        raise UserError(f"{what} outputs NaN or infinite scores on a probe batch")
    return outputs_are_probabilities(outputs)
