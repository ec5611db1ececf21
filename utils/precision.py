"""The one precision policy of every attack, defense and benchmark: whether training steps run under autocast.

`--amp auto` (the default) turns autocast on where it pays: float16 on CUDA (with a GradScaler), bfloat16 on a CPU
that runs it natively (AVX-512 BF16 or AMX), float32 everywhere else. On an AVX2-only CPU bfloat16 is emulated and
a training step is about 10x slower than in float32. `--amp true` / `--amp false` force the choice.
Evaluation (utils.training.predict) always runs in float32, so reported metrics never depend on the choice.
"""
import argparse
import contextlib
import os
from pathlib import Path

import torch

from utils.config import str2bool

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# ONEDNN_MAX_CPU_ISA values that still allow oneDNN's bfloat16 kernels (AVX512_CORE_BF16 and every ISA above it)
_BF16_ISA_TAGS = ("ALL", "BF16", "FP16", "AMX", "AVX10")


def amp_option(text):
    """argparse / YAML type of --amp: 'auto', or a boolean (true/false, yes/no, 1/0, on/off)."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        return str2bool(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected auto, true or false, got {text!r}") from None


def cpu_flags(cpuinfo=Path("/proc/cpuinfo")):
    """The CPU feature flags the kernel reports (empty where there is no /proc/cpuinfo, e.g. macOS)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def native_cpu_bf16(flags=None, capability=None, max_isa=None):
    """(True, why) when this CPU runs bfloat16 natively *as torch will use it*: the hardware flag, and neither
    ATen's capability (ATEN_CPU_CAPABILITY) nor oneDNN's ISA (ONEDNN_MAX_CPU_ISA) limited below it."""
    flags = cpu_flags() if flags is None else set(flags)
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    max_isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "") if max_isa is None else max_isa
    native = [flag for flag in NATIVE_BF16_FLAGS if flag in flags]
    if not native:
        return False, "the CPU has no avx512_bf16 or amx_bf16, so bfloat16 would be emulated (~10x slower)"
    if "AVX512" not in capability.upper() and "AMX" not in capability.upper():
        return False, (f"the CPU has {'/'.join(native)} but torch runs at capability {capability} "
                       "(ATEN_CPU_CAPABILITY), so bfloat16 would be emulated")
    if max_isa and not any(tag in max_isa.upper() for tag in _BF16_ISA_TAGS):
        return False, f"ONEDNN_MAX_CPU_ISA={max_isa} keeps oneDNN below bfloat16, so it would be emulated"
    return True, f"the CPU runs bfloat16 natively ({'/'.join(native)}, torch capability {capability})"


def resolve_amp(requested, device):
    """The policy: (autocast on?, one-line reason) for `requested` ('auto', True or False; None: 'auto') on
    `device`."""
    requested = "auto" if requested is None else amp_option(requested)
    if requested == "auto":
        if device.type == "cuda":
            return True, "precision: float16 autocast (--amp auto on CUDA)"
        if device.type == "cpu":
            native, why = native_cpu_bf16()
            return native, f"precision: {'bfloat16 autocast' if native else 'float32'} (--amp auto: {why})"
        return False, f"precision: float32 (--amp auto: no autocast on {device.type})"
    if not requested:
        return False, "precision: float32 (--amp false)"
    if device.type == "cuda":
        return True, "precision: float16 autocast (--amp true)"
    if device.type == "cpu":
        emulated = "" if native_cpu_bf16()[0] else "; emulated on this CPU: expect ~10x slower steps"
        return True, f"precision: bfloat16 autocast (--amp true{emulated})"
    return False, f"precision: float32 (no autocast on {device.type})"


def autocast(device, enabled, unscaled=False):
    """The autocast context of a training step: float16 on CUDA, bfloat16 on CPU; a null context when not enabled.
    `unscaled`: the caller takes gradients without a GradScaler (torch.autograd.grad), so CUDA uses bfloat16
    where the GPU supports it and float32 where it does not."""
    if not enabled or device.type not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    if device.type == "cpu":
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    if not unscaled:
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    if torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def grad_scaler(device, enabled):
    """A GradScaler for float16 on CUDA (bfloat16 needs none); None otherwise."""
    if not (enabled and device.type == "cuda"):
        return None
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda")
    return torch.cuda.amp.GradScaler()
