"""Time ULRL on attack records: each phase's seconds and images/s, peak memory, before -> after metrics.

    python sh/benchmark_ulrl.py badnet_0_1 blended_0_1              # the reference setting (reference.yaml)
    python sh/benchmark_ulrl.py blended_0_1 --yaml_path config/defense/ulrl/cifar10.yaml   # the default (5% data)
    python sh/benchmark_ulrl.py badnet_0_1 -- --relearn_epochs 5    # anything after -- goes to defense/ulrl.py

Each record runs in a fresh process (so peak memory is its own) and writes its usual outputs to
record/<name>/defense/ulrl/.
"""
import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PHASES = ("load", "evaluate_before", "unlearn", "relearn", "evaluate_after")


def ensure_record(name, record_dir):
    if (record_dir / name / "attack_result.pt").is_file():
        return True
    print(f"error: record {name} not found in {record_dir} (copy the whole record folder there)", file=sys.stderr)
    return False


def report(name, summary, wall):
    print(f"\n== {name}: {summary['model']} on {summary['dataset']}, {summary['device']}, "
          f"{summary['clean_samples']} clean samples, {summary['unlearning_epochs_run']} unlearning epochs ==")
    print(f"{'phase':<16}{'seconds':>10}{'images':>10}{'images/s':>11}")
    for phase in PHASES:
        seconds, images = summary["seconds"][phase], summary["images"].get(phase, 0)
        rate = f"{images / seconds:.1f}" if images else "-"
        print(f"{phase:<16}{seconds:>10.1f}{images or '-':>10}{rate:>11}")
    print(f"{'total':<16}{summary['seconds']['total']:>10.1f}   (process wall time {wall:.1f} s)")
    print(f"peak memory {summary['peak_memory_mib']:.0f} MiB; selected neurons {summary['selected']}")
    before, after = summary["before"], summary["after"]
    print("  ".join(f"{m[5:].upper()} {before[m]:.4f} -> {after[m]:.4f}" for m in ("test_acc", "test_asr", "test_ra"))
          + f"  DER {summary['der']:.4f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("records", nargs="+", help="record folder names under --record_dir")
    parser.add_argument("--record_dir", default="record", help="where the record folders are")
    parser.add_argument("--yaml_path", default="config/defense/ulrl/reference.yaml",
                        help="ULRL's YAML file (default: the reference setting, timed against the authors' code)")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    record_dir = Path(args.record_dir)
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}, "
          f"{__import__('os').cpu_count()} CPUs")
    failures = 0
    for name in args.records:
        if not ensure_record(name, record_dir):
            failures += 1
            continue
        start = time.perf_counter()
        result = subprocess.run([sys.executable, str(REPO_ROOT / "defense" / "ulrl.py"), "--result_file", name,
                                 "--record_dir", str(record_dir), "--yaml_path", args.yaml_path, "--progress",
                                 "False", *extra], cwd=REPO_ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if result.returncode != 0:
            print(f"error: ULRL failed on {name}:\n{result.stderr[-2000:]}", file=sys.stderr)
            failures += 1
            continue
        report(name, json.loads((record_dir / name / "defense" / "ulrl" / "summary.json").read_text()), wall)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
