"""float32 against bfloat16 autocast on this machine, side by side: one SGD training step and one evaluation pass of
the CPU recipe's model (airbench_cpu, batch 256) and of PreAct-ResNet18 (batch 128), with the CPU's flags and the
choice that `--amp auto` makes here.

    python sh/benchmark_precision.py                 # 3 timed repeats after 1 warm-up, on the CPU
    python sh/benchmark_precision.py --repeats 5 --device cuda

The two precisions alternate inside each repeat, so a slow spell of the machine hits both alike; the table gives
the median seconds of each and the ratio bf16 / fp32 (below 1: bfloat16 is faster here).
"""
import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python sh/benchmark_precision.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from utils.errors import run_cli
from utils.models import build_model
from utils.precision import NATIVE_BF16_FLAGS, autocast, cpu_flags, resolve_amp
from utils.runtime import pick_device
from utils.training import prepare_model

CASES = (("airbench_cpu", 256), ("preactresnet18", 128))


def timed(step, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    tick = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - tick


def measure(name, batch_size, device, repeats):
    """{(phase, amp): [seconds]} for a training step and an evaluation pass of one model."""
    torch.manual_seed(0)
    model = prepare_model(build_model(name, 10), device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch_size, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(10, (batch_size,), device=device)

    def train_step(amp):
        model.train()
        with autocast(device, amp, unscaled=True):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def eval_pass(amp):
        model.eval()
        with torch.inference_mode(), autocast(device, amp, unscaled=True):
            model(x)

    times = {}
    for repeat in range(repeats + 1):  # the first round warms up both paths and is not counted
        for phase, step in (("train step", train_step), ("eval pass", eval_pass)):
            for amp in (False, True):
                seconds = timed(lambda: step(amp), device)
                if repeat:
                    times.setdefault((phase, amp), []).append(seconds)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per (model, phase, precision)")
    parser.add_argument("--device", type=str, default="cpu", help="cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    flags = cpu_flags()
    wide = sorted(flag for flag in flags if flag.startswith(("avx", "amx")))
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, device {device}")
    print(f"CPU flags: {' '.join(wide) or 'none of avx*/amx*'}; native bf16 flags present: "
          f"{', '.join(f for f in NATIVE_BF16_FLAGS if f in flags) or 'none'}")
    print(resolve_amp("auto", device)[1])
    print(f"\n{'model':<16}{'batch':>6}  {'phase':<11}{'fp32 s':>9}{'bf16 s':>9}{'bf16/fp32':>11}")
    for name, batch_size in CASES:
        times = measure(name, batch_size, device, args.repeats)
        for phase in ("train step", "eval pass"):
            fp32, bf16 = (statistics.median(times[(phase, amp)]) for amp in (False, True))
            print(f"{name:<16}{batch_size:>6}  {phase:<11}{fp32:>9.3f}{bf16:>9.3f}{bf16 / fp32:>10.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
