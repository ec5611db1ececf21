"""Run one or more defenses over many record folders, one log per run, resumable.

    python sh/batch.py --defenses ulrl ft                        # every record under record/
    python sh/batch.py --defenses ulrl --records badnet_cpu blended_cpu -- --eval_every 5
    bash sh/batch.sh --defenses tsbd --record_dir /data/records
    python sh/batch.py --defenses ulrl ft --executor slurm --slurm_config my_cluster.yaml   # a SLURM job array

Skips a (record, defense) pair whose result exists (record/<r>/defense/<d>/summary.json; --force reruns), keeps
going when a run fails, writes <log_dir>/<record>__<defense>.log for each run and batch_summary.csv, and ends with
what ran, what was skipped and what failed (exit status 1 when anything failed) and the results table of every
requested pair, old results included (summary.csv/.md/.png in <log_dir>). Options after `--` go to every
defense. The YAML is config/defense/<defense>/<dataset>.yaml (with --dataset) or its config.yaml.
With --executor slurm the pending pairs go to SLURM as one job array (submitit; resources from
config/executor/slurm.yaml, --slurm_config and --slurm_* options), the runner waits for it, and the same logs and table
follow; --dry_run prints what would be submitted.
"""
import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python sh/batch.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.batch import defense_job, record_names, run_jobs, write_report  # noqa: E402
from utils.benchmark import collect, write_outputs  # noqa: E402
from utils.catalog import DEFENSES  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402
from utils.slurm import add_executor_options, slurm_settings  # noqa: E402


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="%(prog)s --defenses NAME [NAME ...] [options] [-- defense options]")
    parser.add_argument("--defenses", nargs="+", required=True,
                        help="any of: " + "; ".join(f"{name} ({entry.summary})" for name, entry in DEFENSES.items()))
    parser.add_argument("--records", nargs="+", help="record folder names (default: every record in --record_dir)")
    parser.add_argument("--record_dir", default="record", help="where the record folders are (default: record)")
    parser.add_argument("--dataset", help="passed to every defense (default: each record's own)")
    parser.add_argument("--log_dir", help="default: <record_dir>/batch_logs/<date_time>")
    parser.add_argument("--force", action="store_true", help="rerun pairs whose result exists")
    parser.add_argument("--timeout", type=float, help="seconds after which one run is stopped (counted as failed)")
    add_executor_options(parser)
    args = parser.parse_args(argv)
    slurm = slurm_settings(args) if args.executor == "slurm" else None
    records = args.records or record_names(args.record_dir)
    if not records:
        raise UserError(f"no record (folder with attack_result.pt) in {args.record_dir}")
    missing = [name for name in records if not (Path(args.record_dir) / name / "attack_result.pt").is_file()]
    if missing:
        raise UserError(f"not a record folder (no attack_result.pt) under {args.record_dir}: {', '.join(missing)}")
    log_dir = Path(args.log_dir or Path(args.record_dir) / "batch_logs" / time.strftime("%Y%m%d_%H%M%S"))
    jobs = [defense_job(defense, record, args.record_dir, log_dir, args.dataset, extra)
            for record in records for defense in args.defenses]
    report = run_jobs(jobs, force=args.force, timeout=args.timeout, slurm=slurm, dry_run=args.dry_run)
    if args.dry_run:
        return 0
    print("\n".join(report.lines()))
    print(f"summary: {write_report(report, log_dir)}")
    # the table a comparison needs, whether the results are new or were already there; `none` = the record itself
    table = collect({record: Path(args.record_dir) / record for record in records}, ["none", *args.defenses])
    print(write_outputs(table, log_dir, first_column="record"))
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
