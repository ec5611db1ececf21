"""utils/precision.py: the one precision policy (--amp auto / true / false) and its reasons."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from utils import precision
from utils.precision import amp_option, autocast, grad_scaler, native_cpu_bf16, resolve_amp

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("text, value", [("auto", "auto"), ("AUTO", "auto"), ("true", True), ("False", False),
                                         ("1", True), ("off", False), (True, True), (False, False)])
def test_amp_option_parses_auto_and_booleans(text, value):
    assert amp_option(text) == value


def test_amp_option_rejects_anything_else():
    with pytest.raises(Exception, match="auto, true or false"):
        amp_option("maybe")


@pytest.mark.parametrize("flags, capability, isa, native", [
    ({"avx2"}, "AVX2", "", False),  # AVX2-only CPU: emulated
    ({"avx512f", "avx512_bf16"}, "AVX512", "", True),
    ({"amx_bf16", "avx512_bf16"}, "AVX512", "AVX512_CORE_AMX", True),
    ({"avx512_bf16"}, "AVX2", "", False),  # ATEN_CPU_CAPABILITY=avx2 on a bf16 machine
    ({"avx512_bf16"}, "AVX512", "AVX2", False),  # ONEDNN_MAX_CPU_ISA=AVX2 on a bf16 machine
    ({"avx512_bf16"}, "AVX512", "AVX512_CORE_BF16", True),
    (set(), "DEFAULT", "", False),  # no /proc/cpuinfo (macOS) or an old CPU
])
def test_native_bf16_needs_the_flag_and_no_limit_below_it(flags, capability, isa, native):
    answer, why = native_cpu_bf16(flags, capability, isa)
    assert answer is native and why


def test_auto_follows_the_hardware_on_cpu(monkeypatch):
    monkeypatch.setattr(precision, "native_cpu_bf16", lambda: (True, "native here"))
    assert resolve_amp("auto", CPU) == (True, "precision: bfloat16 autocast (--amp auto: native here)")
    monkeypatch.setattr(precision, "native_cpu_bf16", lambda: (False, "emulated here"))
    assert resolve_amp("auto", CPU) == (False, "precision: float32 (--amp auto: emulated here)")
    assert resolve_amp(None, CPU) == resolve_amp("auto", CPU)  # a YAML's `amp: null`


def test_forced_choices_and_other_devices(monkeypatch):
    monkeypatch.setattr(precision, "native_cpu_bf16", lambda: (False, "emulated here"))
    enabled, why = resolve_amp(True, CPU)
    assert enabled and "bfloat16" in why and "10x slower" in why  # forced, with a warning in the reason
    assert resolve_amp("false", CPU) == (False, "precision: float32 (--amp false)")
    assert resolve_amp("auto", CUDA)[0] is True and "float16" in resolve_amp("auto", CUDA)[1]
    assert resolve_amp("auto", torch.device("meta"))[0] is False


def test_autocast_types_and_scaler():
    with autocast(CPU, True):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    with autocast(CPU, False):
        assert not torch.is_autocast_enabled("cpu")
    assert grad_scaler(CPU, True) is None and grad_scaler(CUDA, False) is None


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert precision.cpu_flags(info) == {"fpu", "avx2", "avx512_bf16"}
    assert precision.cpu_flags(tmp_path / "absent") == set()


def test_an_avx2_limited_torch_gets_float32_on_any_machine():
    """ATEN_CPU_CAPABILITY=avx2 is how an AVX-512 machine behaves like an AVX2-only one: the policy must see it."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    code = ("import torch; from utils.precision import resolve_amp; "
            "print(torch.backends.cpu.get_cpu_capability()); print(resolve_amp('auto', torch.device('cpu'))[1])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.splitlines()
    assert out[0] == "AVX2"
    assert out[1].startswith("precision: float32 (--amp auto:")
