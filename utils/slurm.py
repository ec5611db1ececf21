"""The SLURM executor of the batch runner and the benchmark: every pending job of a batch becomes one task of a SLURM
job array, submitted through submitit; the driver waits for the array and reports each task like a local run.

A task runs the same command line as the local executor, from the repository root, with its output going to the same
log file (<log_dir>/<job>.log); submitit's own files (the sbatch script, the task's stdout/stderr) go to
<log_dir>/slurm/. Resources come from config/executor/slurm.yaml, a YAML given with --slurm_config, then the
--slurm_* options. Only the standard library, submitit's CommandFunction and the command itself run on the nodes, so
nothing of ours is pickled.
"""
import shlex
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

from utils.config import read_yaml
from utils.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SLURM_CONFIG = REPO_ROOT / "config" / "executor" / "slurm.yaml"
EXIT_MARK = "batch: exit status "  # the last line a task writes to its log: "batch: exit status N after S s"


@dataclass
class SlurmSettings:
    partition: str = None  # None: the cluster's default partition
    time_min: int = 60  # each task's wall-clock limit
    cpus_per_task: int = 2
    gpus_per_node: int = 0
    mem_gb: float = None  # None: the partition's default
    array_parallelism: int = 64  # at most this many tasks of the array at once
    poll_seconds: float = 5.0
    additional: dict = field(default_factory=dict)  # more sbatch options, e.g. {account: lab, qos: short}

    def submitit_parameters(self):
        parameters = {"timeout_min": int(self.time_min), "cpus_per_task": int(self.cpus_per_task),
                      "slurm_array_parallelism": int(self.array_parallelism), "nodes": 1, "tasks_per_node": 1}
        if self.gpus_per_node:
            parameters["gpus_per_node"] = int(self.gpus_per_node)
        if self.partition:
            parameters["slurm_partition"] = self.partition
        if self.mem_gb:
            parameters["mem_gb"] = float(self.mem_gb)
        if self.additional:
            parameters["slurm_additional_parameters"] = dict(self.additional)
        return parameters


def add_executor_options(parser):
    """--executor and the --slurm_* options (shared by sh/batch.py and sh/benchmark.py)."""
    group = parser.add_argument_group("executor (where the runs go)")
    group.add_argument("--executor", choices=["local", "slurm"], default="local",
                       help="local: one run after another on this machine (default); slurm: one SLURM job array per "
                            "stage, through submitit")
    group.add_argument("--slurm_config", help="a YAML of SLURM resources (default: config/executor/slurm.yaml)")
    for item in fields(SlurmSettings):
        if item.name != "additional":
            group.add_argument(f"--slurm_{item.name}", type=str if item.name == "partition" else float,
                               help=f"overrides {item.name} of the SLURM config")
    group.add_argument("--dry_run", action="store_true",
                       help="print what would run (and, with slurm, the resources asked for); run nothing")


def slurm_settings(args):
    """SlurmSettings from the default YAML, --slurm_config, then the --slurm_* options."""
    values = read_yaml(DEFAULT_SLURM_CONFIG) if DEFAULT_SLURM_CONFIG.is_file() else {}
    if args.slurm_config:
        values.update(read_yaml(args.slurm_config) or {})
    known = {item.name for item in fields(SlurmSettings)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"unknown SLURM setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    for name in known - {"additional"}:
        value = getattr(args, f"slurm_{name}", None)
        if value is not None:
            values[name] = value
    return SlurmSettings(**values)


def task_command(job, timeout=None):
    """The shell line a task runs: the job's command from the repository root, output appended to its log, ending
    with the exit-status line that the driver reads."""
    command = shlex.join(str(part) for part in job.command)
    if timeout:
        command = f"timeout --signal=TERM --kill-after=30 {int(timeout)} {command}"
    log = shlex.quote(str(job.log))
    return (f"cd {shlex.quote(str(REPO_ROOT))} && start=$SECONDS; {command} >> {log} 2>&1; code=$?; "
            f"echo \"{EXIT_MARK}$code after $((SECONDS - start)) s\" >> {log}; exit $code")


def read_exit(log):
    """(exit status, seconds) from the last line a task wrote, or (None, None) when it never got there."""
    try:
        lines = Path(log).read_text(errors="replace").splitlines()
    except OSError:
        return None, None
    for line in reversed(lines):
        if line.startswith(EXIT_MARK):
            words = line[len(EXIT_MARK):].split()
            return int(words[0]), float(words[2])
    return None, None


def run_on_slurm(jobs, settings, report, timeout=None, echo=print):
    """Submit `jobs` (the pending ones) as one job array, wait for it, and add each to `report` (ran or failed, with
    the log's path and submitit's stderr for the failed)."""
    try:
        import submitit
    except ImportError:
        raise UserError("--executor slurm needs submitit: python -m pip install submitit") from None
    if not jobs:
        return report
    folder = jobs[0].log.parent / "slurm"
    # each task's status is read from its log's exit line: a cluster without accounting (no sacct, as the single-node
    # SLURM of sh/slurm_local.sh) is fine, so submitit's warning about sacct is noise here
    warnings.filterwarnings("ignore", message=".*sacct.*")
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(name="backdoor-batch", **settings.submitit_parameters())
    for job in jobs:
        job.log.parent.mkdir(parents=True, exist_ok=True)
        job.log.write_text("$ " + " ".join(map(str, job.command)) + "\n")
    functions = [submitit.helpers.CommandFunction(["bash", "-c", task_command(job, timeout)]) for job in jobs]
    try:
        with executor.batch():
            tasks = [executor.submit(function) for function in functions]
    except Exception as error:  # sbatch missing or refusing: one line, nothing submitted
        raise UserError(f"SLURM refused the job array: {str(error).strip().splitlines()[-1]}") from None
    echo(f"submitted {len(tasks)} task(s) as SLURM job array {tasks[0].job_id.split('_')[0]}; "
         f"submitit files in {folder}")
    pending = dict(zip(range(len(jobs)), tasks))
    while pending:
        for index in [i for i, task in pending.items() if task.done()]:
            task, job = pending.pop(index), jobs[index]
            code, seconds = read_exit(job.log)
            if code == 0 and job.result.is_file():
                report.ran.append((job.name, seconds))
                echo(f"{job.name}: done in {seconds:.1f} s (SLURM task {task.job_id})")
            else:
                status = code if code not in (0, None) else ("0, but no result file" if code == 0 else
                                                            f"no exit line: SLURM state {task.state}")
                report.failed.append((job.name, status, job.log))
                echo(f"{job.name}: FAILED (exit {status}); logs {job.log} and {task.paths.stderr}")
        if pending:
            time.sleep(settings.poll_seconds)
    return report


def describe(jobs, settings, timeout=None):
    """What --dry_run prints for the SLURM executor: the resources, then one task line per job."""
    lines = [f"would submit {len(jobs)} task(s) as one SLURM job array with {settings.submitit_parameters()}"]
    lines += [f"  {job.name}: {task_command(job, timeout)}" for job in jobs]
    return lines
