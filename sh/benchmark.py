"""The attack x defense benchmark on CIFAR-10: builds the attack records it needs (one per attack and seed), runs
every defense on each, writes the table (ACC, ASR, RA, DER, seconds; mean ± spread over seeds), a heat-map of ASR after
defense, and scores its verdicts against BackdoorBench's leaderboard.

    python sh/benchmark.py --scale proxy      # PreAct-ResNet18 at 1/4 width, 5-epoch recipe: the CPU proxy
    python sh/benchmark.py --scale cpu        # airbench_cpu, 18 epochs: a small network (its verdicts disagree)
    python sh/benchmark.py --scale paper      # PreAct-ResNet18, 100-epoch attacks: for a GPU machine
    python sh/benchmark.py --scale paper --epochs 1 --dataset_path toy_data --record_dir toy   # a smoke test
    python sh/benchmark.py --scale proxy --seeds 0 --attacks badnet blended --defenses none ft anp clp
    python sh/benchmark.py --scale paper --executor slurm --slurm_config my_cluster.yaml   # on a cluster
    python sh/benchmark.py --scale proxy --recipe config/attack/prototype/proxy_candidates/c1_onecycle_lr0.2.yaml

Attacks are all-to-one, target 0, 10% poisoning, named record/<attack>_<scale> for seed 0 and
record/<attack>_<scale>_seed<N> for seed N; a record that exists is reused and a defense result that exists is not
recomputed, so an interrupted benchmark continues where it stopped (delete record/<record>/defense/<defense>/ to redo
one cell). Output in record/benchmark/<scale>/: runs.csv (one row per seed), summary.csv and summary.md (mean and
spread over seeds, the leaderboard score), asr_heatmap.png, logs/ (one log per run) and benchmark.json (date,
machine, wall time); the summary is printed at the end. --recipe trains the attacks with another prototype YAML
(a candidate proxy): its records are <attack>_<scale>_<recipe file stem>[_seed<N>], its outputs in
record/benchmark/<scale>_<stem>/, so candidates never mix. Every defense runs at its config/defense/<name>/cifar10.yaml.
The leaderboard (resource/leaderboard/cifar10.md, or --leaderboard) scores every cell that it holds: a cell agrees
when both say the same about the defended ASR (at most 20%: removes). Defenses not on it are reported, not scored.
Expected time at paper scale (an estimate from the model's cost, not measured here): about 20 minutes per attack
record on one A100/H100-class GPU, so 6 attacks x 3 seeds in about 6 hours plus the defenses; on 2 CPU cores,
weeks. --epochs shrinks any scale to a smoke test (its tables then say so); --dataset_path says where cifar10/ is.
With --executor slurm the attacks go to SLURM as one job array, then the defenses as a second (submitit; resources
from config/executor/slurm.yaml, --slurm_config, --slurm_*); the driver waits for each and writes the same outputs.
"""
import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python sh/benchmark.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.batch import REPO_ROOT, Job, defense_job, run_jobs, write_report  # noqa: E402
from utils.benchmark import aggregate, collect_seeds, write_benchmark  # noqa: E402
from utils.catalog import ATTACKS, DEFENSES  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402
from utils.leaderboard import read_leaderboard  # noqa: E402
from utils.slurm import add_executor_options, slurm_settings  # noqa: E402

SCALES = {  # scale -> the prototype YAML (training recipe) of its attacks, and the label its tables carry
    "proxy": ("config/attack/prototype/cifar10_proxy.yaml",
              "proxy (PreAct-ResNet18 at 1/4 width, cosine lr 0.02, 5 epochs; WaNet 12, BPP 10, Input-aware 8)"),
    "cpu": ("config/attack/prototype/cifar10_cpu.yaml", "cpu, a small network (airbench_cpu, 18-epoch CPU recipe)"),
    "paper": ("config/attack/prototype/cifar10.yaml", "paper (PreAct-ResNet18, BackdoorBench's 100-epoch recipe)"),
}
DATASET = "cifar10"


def attack_yaml(attack, scale):
    """config/attack/<attack>/<scale>.yaml when the attack needs scale-specific settings, else default.yaml."""
    folder = REPO_ROOT / "config" / "attack" / attack
    for name in (f"{scale}.yaml", "default.yaml"):
        if (folder / name).is_file():
            return str((folder / name).relative_to(REPO_ROOT))
    raise UserError(f"attack {attack!r} has no config/attack/{attack}/default.yaml")


def record_name(attack, scale, seed, variant=None):
    base = f"{attack}_{scale}" + (f"_{variant}" if variant else "")
    return base if seed == 0 else f"{base}_seed{seed}"


def attack_job(attack, scale, seed, record_dir, log_dir, recipe=None, extra=()):
    """The attack's run at `scale` (its prototype YAML, or `recipe`, a candidate's, which names the record too);
    `extra`: further options (--epochs, --dataset_path of a smoke test)."""
    script = REPO_ROOT / ATTACKS.lookup(attack).script
    name = record_name(attack, scale, seed, Path(recipe).stem if recipe else None)
    command = [sys.executable, str(script), "--yaml_path", recipe or SCALES[scale][0],
               "--bd_yaml_path", attack_yaml(attack, scale),
               "--save_folder_name", name, "--record_dir", str(Path(record_dir).resolve()), "--dataset", DATASET,
               "--attack_target", "0", "--pratio", "0.1", "--attack_label_trans", "all2one", "--progress", "False",
               "--random_seed", str(seed), *map(str, extra)]
    return Job(name=f"attack {name}", command=command, log=Path(log_dir) / f"attack_{name}.log",
               result=Path(record_dir).resolve() / name / "attack_result.pt")


def machine():
    """One line naming the machine (CPU model, cores, GPU, torch)."""
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), required=True)
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS), metavar="ATTACK",
                        help=f"default: all ({', '.join(ATTACKS)})")
    parser.add_argument("--defenses", nargs="+", default=["none", *DEFENSES], choices=["none", *DEFENSES],
                        metavar="DEFENSE", help=f"'none' is the backdoored model (default: none {' '.join(DEFENSES)})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="attack seeds (default: 0 1 2)")
    parser.add_argument("--leaderboard", help="the leaderboard file to score against (default: "
                        "resource/leaderboard/cifar10.md)")
    parser.add_argument("--recipe", help="a prototype YAML to train the attacks with instead of the scale's (a "
                        "candidate proxy; records and outputs are named after its file)")
    parser.add_argument("--record_dir", default="record")
    parser.add_argument("--out", help="default: <record_dir>/benchmark/<scale>[_<recipe stem>]")
    parser.add_argument("--timeout", type=float, help="seconds after which one attack or defense run is stopped")
    parser.add_argument("--epochs", type=int, help="train every attack this many epochs instead of its recipe's "
                        "(a smoke test; the tables say so)")
    parser.add_argument("--dataset_path", help="folder holding cifar10/ for attacks and defenses (default: their "
                        "configs', data)")
    add_executor_options(parser)
    args = parser.parse_args(argv)
    slurm = slurm_settings(args) if args.executor == "slurm" else None
    started = time.perf_counter()
    variant = Path(args.recipe).stem if args.recipe else None
    if args.recipe and not Path(args.recipe).is_file() and not (REPO_ROOT / args.recipe).is_file():
        raise UserError(f"--recipe {args.recipe}: no such file")
    out = Path(args.out or Path(args.record_dir) / "benchmark" / (args.scale + (f"_{variant}" if variant else "")))
    logs = out / "logs"

    leaderboard = read_leaderboard(args.leaderboard)  # a bad file stops here, before hours of training

    data = ["--dataset_path", args.dataset_path] if args.dataset_path else []
    attack_extra = data + (["--epochs", args.epochs] if args.epochs is not None else [])
    attack_report = run_jobs([attack_job(a, args.scale, seed, args.record_dir, logs, args.recipe, attack_extra)
                              for seed in args.seeds for a in args.attacks], timeout=args.timeout, slurm=slurm,
                             dry_run=args.dry_run)
    records = {seed: {a: Path(args.record_dir) / record_name(a, args.scale, seed, variant) for a in args.attacks}
               for seed in args.seeds}
    jobs = [defense_job(d, folder.name, args.record_dir, logs, DATASET, data)
            for by_attack in records.values() for folder in by_attack.values()
            if args.dry_run or (folder / "attack_result.pt").is_file() for d in args.defenses if d != "none"]
    defense_report = run_jobs(jobs, timeout=args.timeout, slurm=slurm, dry_run=args.dry_run)
    if args.dry_run:
        return 0
    report = attack_report.extend(defense_report)
    print("\n".join(report.lines()))
    write_report(report, logs)

    wall = time.perf_counter() - started
    info = {"scale": args.scale, "recipe": args.recipe or SCALES[args.scale][0], "epochs": args.epochs,
            "dataset_path": args.dataset_path,
            "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(),
            "wall_seconds_this_invocation": wall, "attacks": args.attacks, "defenses": args.defenses, "seeds": args.seeds}
    label = SCALES[args.scale][1] + (f", recipe {args.recipe}" if args.recipe else "")
    if args.epochs is not None:
        label += f"; SMOKE TEST, not this scale: {args.epochs} attack epochs"
    title = (f"Scale: {label}. CIFAR-10, all-to-one target 0, 10% poisoning, attack seeds "
             f"{' '.join(map(str, args.seeds))}; {info['date']}, {info['machine']}")
    runs = collect_seeds(records, args.defenses)
    text = write_benchmark(runs, aggregate(runs, leaderboard.verdict), leaderboard, out, title)
    (out / "benchmark.json").write_text(json.dumps(info, indent=2) + "\n")
    print(text)
    print(f"wall time of this invocation: {wall / 60:.1f} min (reused records and results cost nothing); "
          f"outputs in {out}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
