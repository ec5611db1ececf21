"""Batch runs: many (record, defense) pairs, one subprocess and one log each, resumable.

A pair whose result exists (record/<record>/defense/<defense>/summary.json, written last by every defense and only
when the run succeeded) is skipped; a failing run is logged and the batch goes on; the end is a report of what
ran, what was skipped and what failed.
"""
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from utils.catalog import DEFENSES
from utils.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Job:
    """One command with its log file; `result` is the file whose presence means the job is already done."""
    name: str
    command: list
    log: Path
    result: Path


@dataclass
class BatchReport:
    ran: list = field(default_factory=list)  # (job name, seconds)
    skipped: list = field(default_factory=list)  # job names
    failed: list = field(default_factory=list)  # (job name, exit code, log path)

    def extend(self, other):
        self.ran += other.ran
        self.skipped += other.skipped
        self.failed += other.failed
        return self

    def lines(self):
        lines = [f"ran {len(self.ran)}, skipped {len(self.skipped)} (result exists), failed {len(self.failed)}"]
        lines += [f"  ran     {name} ({seconds:.1f} s)" for name, seconds in self.ran]
        lines += [f"  skipped {name}" for name in self.skipped]
        lines += [f"  FAILED  {name} (exit {code}; log {log})" for name, code, log in self.failed]
        return lines

    def rows(self):
        return ([{"job": name, "status": "ran", "seconds": seconds, "log": ""} for name, seconds in self.ran]
                + [{"job": name, "status": "skipped", "seconds": "", "log": ""} for name in self.skipped]
                + [{"job": name, "status": f"failed (exit {code})", "seconds": "", "log": str(log)}
                   for name, code, log in self.failed])


def defense_yaml(defense, dataset=None):
    """config/defense/<defense>/<dataset>.yaml when it exists, else its config.yaml (None when neither does)."""
    folder = REPO_ROOT / "config" / "defense" / defense
    for name in ([f"{dataset}.yaml"] if dataset else []) + ["config.yaml"]:
        if (folder / name).is_file():
            return str((folder / name).relative_to(REPO_ROOT))
    return None


def defense_job(defense, record, record_dir, log_dir, dataset=None, extra=()):
    """The job that runs `defense` on record_dir/record as a user would type it."""
    script = DEFENSES.lookup(defense).script
    record_dir = Path(record_dir).resolve()  # the run's working directory is the repository root
    command = [sys.executable, str(REPO_ROOT / script), "--result_file", record,
               "--record_dir", str(record_dir), "--progress", "False"]
    yaml_path = defense_yaml(defense, dataset)
    if yaml_path:
        command += ["--yaml_path", yaml_path]
    if dataset:
        command += ["--dataset", dataset]
    command += [str(arg) for arg in extra]
    return Job(name=f"{record}/{defense}", command=command, log=Path(log_dir) / f"{record}__{defense}.log",
               result=record_dir / record / "defense" / defense / "summary.json")


def record_names(record_dir):
    """Every folder of record_dir that holds an attack_result.pt, sorted; hidden folders (an attack's
    .NAME.partial-* while it runs, or left by a killed one) are not records."""
    record_dir = Path(record_dir)
    if not record_dir.is_dir():
        raise UserError(f"record folder {record_dir} does not exist")
    return sorted(path.parent.name for path in record_dir.glob("*/attack_result.pt")
                  if not path.parent.name.startswith("."))


def run_jobs(jobs, force=False, timeout=None, echo=print, slurm=None, dry_run=False):
    """Run the jobs whose result is missing (all with `force`), never stopping at a failure: one after another
    from the repository root, or, given `slurm` (utils.slurm.SlurmSettings), as one SLURM job array. `dry_run`
    prints what would run instead."""
    report = BatchReport()
    pending = []
    for number, job in enumerate(jobs, 1):
        if job.result.is_file() and not force:
            report.skipped.append(job.name)
            echo(f"[{number}/{len(jobs)}] {job.name}: skipped (result exists: {job.result})")
        else:
            pending.append(job)
    if dry_run:
        from utils.slurm import describe
        lines = (describe(pending, slurm, timeout) if slurm else
                 [f"would run {job.name}: {' '.join(map(str, job.command))}" for job in pending])
        for line in lines:
            echo(line)
        return report
    if slurm:
        from utils.slurm import run_on_slurm
        return run_on_slurm(pending, slurm, report, timeout, echo)
    for number, job in enumerate(pending, 1):
        prefix = f"[{number}/{len(pending)}] {job.name}"
        job.log.parent.mkdir(parents=True, exist_ok=True)
        echo(f"{prefix}: running (log {job.log})")
        tick = time.perf_counter()
        with open(job.log, "w") as log:
            log.write("$ " + " ".join(map(str, job.command)) + "\n")
            log.flush()
            try:
                code = subprocess.run(job.command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                      timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                log.write(f"\nbatch: stopped after the --timeout of {timeout} s\n")
                code = "timeout"
        seconds = time.perf_counter() - tick
        if code == 0 and job.result.is_file():
            report.ran.append((job.name, seconds))
            echo(f"{prefix}: done in {seconds:.1f} s")
        else:
            code = code if code != 0 else "0, but no result file"
            report.failed.append((job.name, code, job.log))
            echo(f"{prefix}: FAILED (exit {code}) after {seconds:.1f} s; see {job.log}")
    return report


def write_report(report, log_dir):
    """batch_summary.csv in log_dir; returns its path."""
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    path = Path(log_dir) / "batch_summary.csv"
    pd.DataFrame(report.rows(), columns=["job", "status", "seconds", "log"]).to_csv(path, index=False)
    return path
