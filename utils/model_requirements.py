"""What each defense needs of a model, checked once the model is built and before any data is read or evaluated, so
that a model a defense cannot handle (no BatchNorm, no classifier head, ...) ends the run with one clear line at the
start instead of after the evaluation before the defense.

Every registered defense has an entry here (a test holds the two lists together); a defense that works on any
differentiable classifier has `None`. The checks call the same library functions the defenses use later, so the
answer here is the answer the defense would give.
"""
import torch
import torch.nn as nn

from utils.catalog import DEFENSES
from utils.errors import UserError
from utils.model_graph import find_prunable_channels, traced_pairs
from utils.models import classifier_head
from utils.pruning import batchnorm_layers
from utils.training import eval_mode
from utils.unlearning import nwc_layers
from utils.user_models import probe_batch


def _probe(model, record):
    parameter = next(iter(model.parameters()), None)
    x = probe_batch(record.img_size, count=2)
    return x if parameter is None else x.to(device=parameter.device, dtype=parameter.dtype)


def _needs_conv(model, title, why):
    if not any(isinstance(module, nn.Conv2d) for module in model.modules()):
        raise UserError(f"{title} {why}, but this model ({type(model).__name__}) has no Conv2d layer: "
                        f"{title} does not apply to it")


def check_clp(model, record, args):
    _needs_conv(model, "CLP", "scores Conv2d channels through the BatchNorm2d that follows each")
    if not any(isinstance(m, nn.BatchNorm2d) and m.affine for m in model.modules()):
        raise UserError(f"CLP scores each Conv2d channel through the BatchNorm2d after it, but this model "
                        f"({type(model).__name__}) has no BatchNorm2d: CLP does not apply to it")
    if getattr(args, "pairing", "traced") == "traced" and not traced_pairs(model, record.img_size):
        raise UserError("CLP found no Conv2d whose output feeds a BatchNorm2d in this model (traced): nothing to "
                        "score; --pairing module_order pairs by module order instead")


def check_batchnorm(title):
    def check(model, record, args):
        batchnorm_layers(model, title)
    return check


def check_tsbd(model, record, args):
    nwc_layers(model, getattr(args, "skip_layers", None) or ())


def check_head(title):
    def check(model, record, args):
        if title == "ULRL" and getattr(args, "scope", "head") == "all":
            if not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules()):
                raise UserError("ULRL --scope all scores Conv2d and Linear layers, and this model has none")
            return
        classifier_head(model, record.num_classes, getattr(args, "linear_name", None))
    return check


def check_fp(model, record, args):
    with torch.no_grad():
        find_prunable_channels(model, _probe(model, record), getattr(args, "pool_name", None))


@torch.no_grad()
def feature_map_outputs(model, x):
    """{module name: output shape} of every module that outputs a 4-D feature map on one eval-mode pass of `x`."""
    shapes = {}

    def hook(name):
        def record(_module, _inputs, output):
            if torch.is_tensor(output) and output.dim() == 4:
                shapes.setdefault(name, tuple(output.shape))
        return record
    handles = [module.register_forward_hook(hook(name)) for name, module in model.named_modules() if name]
    with eval_mode(model, handles):
        model(x)
    return shapes


def check_nad(model, record, args):
    """The layers NAD distils: named ones must exist and output feature maps; `auto` needs at least as many
    feature-map resolutions above 1x1 as there are betas (the defense's own rule then picks the stages)."""
    _needs_conv(model, "NAD", "distils the attention of feature maps")
    names, count = getattr(args, "layer_names", ["auto"]), len(getattr(args, "betas", []) or [])
    shapes = feature_map_outputs(model, _probe(model, record))
    if names == ["auto"]:
        resolutions = {shape[-2:] for shape in shapes.values() if shape[-2] * shape[-1] > 1}
        if len(resolutions) < count:
            raise UserError(f"NAD: --layer_names auto needs {count} feature-map resolutions above 1x1 and this model "
                            f"({type(model).__name__}) has {len(resolutions)}; name the layers with --layer_names "
                            "(and as many --betas)")
        return
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules or not name:
            raise UserError(f"NAD: no module named {name!r} in this model ({type(model).__name__}); --layer_names "
                            "takes qualified module names, or auto")
        if name not in shapes:
            raise UserError(f"NAD: layer {name} does not output a feature map (N, C, H, W) in this model")


MODEL_REQUIREMENTS = {
    "ulrl": check_head("ULRL"),
    "tsbd": check_tsbd,
    "ft": None,
    "fp": check_fp,
    "nad": check_nad,
    "nc": None,
    "anp": check_batchnorm("ANP"),
    "rnp": check_batchnorm("RNP"),
    "clp": check_clp,
    "fst": check_head("FST"),
    "ibau": None,
    "sau": None,
}


def model_check(defense):
    """check(model, record, args) for the registered `defense` (None: any classifier will do)."""
    DEFENSES.lookup(defense)
    if defense not in MODEL_REQUIREMENTS:
        raise KeyError(f"defense {defense} has no entry in utils/model_requirements.MODEL_REQUIREMENTS")
    return MODEL_REQUIREMENTS[defense]
