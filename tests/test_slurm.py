"""The SLURM executor (utils/slurm.py): settings, the task line, --dry_run, and a real sweep through a running SLURM
(sh/slurm_local.sh starts a single-node one) whose table must equal the local executor's for the same sweep.
The real-SLURM tests skip where no SLURM answers, unless REQUIRE_SLURM=1 (CI starts one and sets it)."""
import argparse
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from helpers import run_script
from utils.batch import Job, run_jobs
from utils.errors import UserError
from utils.slurm import EXIT_MARK, SlurmSettings, add_executor_options, read_exit, slurm_settings, task_command
from utils.synthetic import write_synthetic_cifar10, write_tiny_record


def _args(*argv):
    parser = argparse.ArgumentParser()
    add_executor_options(parser)
    return parser.parse_args(argv)


def test_settings_come_from_the_yaml_then_a_config_then_options(tmp_path):
    default = slurm_settings(_args())
    assert default == SlurmSettings(**{**SlurmSettings().__dict__, "additional": {}})
    config = tmp_path / "cluster.yaml"
    config.write_text("partition: gpu\ngpus_per_node: 1\nadditional: {account: lab}\n")
    settings = slurm_settings(_args("--slurm_config", str(config), "--slurm_time_min", "30"))
    assert (settings.partition, settings.gpus_per_node, settings.time_min) == ("gpu", 1, 30)
    parameters = settings.submitit_parameters()
    assert parameters["slurm_partition"] == "gpu" and parameters["gpus_per_node"] == 1
    assert parameters["timeout_min"] == 30 and parameters["slurm_additional_parameters"] == {"account": "lab"}
    assert "gpus_per_node" not in default.submitit_parameters()
    config.write_text("partitoin: gpu\n")
    with pytest.raises(UserError, match="unknown SLURM setting.*partitoin"):
        slurm_settings(_args("--slurm_config", str(config)))


def test_the_task_line_logs_and_ends_with_its_exit_status(tmp_path):
    job = Job("j", [sys.executable, "-c", "print('it ran'); raise SystemExit(3)"], tmp_path / "j it.log",
              tmp_path / "none")
    job.log.write_text("$ header\n")
    line = task_command(job, timeout=60)
    assert "timeout" in line and "'" in line  # the log's space is quoted
    code = subprocess.run(["bash", "-c", line]).returncode
    assert code == 3
    text = job.log.read_text()
    assert text.startswith("$ header\n") and "it ran" in text and f"{EXIT_MARK}3 after" in text
    assert read_exit(job.log)[0] == 3 and read_exit(tmp_path / "absent.log") == (None, None)


def _world(tmp_path):
    """Synthetic CIFAR-10, two tiny records and one broken record folder."""
    cifar10 = write_synthetic_cifar10(tmp_path / "data" / "cifar10", train_per_batch=40, test_count=60)
    records = tmp_path / "records"
    write_tiny_record(records, "tiny_a", cifar10, seed=0)
    write_tiny_record(records, "tiny_b", cifar10, seed=1)
    (records / "broken").mkdir()
    (records / "broken" / "attack_result.pt").write_bytes(b"not a record")
    return records


def test_dry_run_prints_the_array_and_submits_nothing(tmp_path):
    records = _world(tmp_path)
    result = run_script("sh/batch.py", "--defenses", "ft", "clp", "--record_dir", records, "--executor", "slurm",
                        "--slurm_partition", "gpu", "--dry_run", "--log_dir", tmp_path / "logs", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "would submit 6 task(s) as one SLURM job array" in result.stdout and "'slurm_partition': 'gpu'" in result.stdout
    assert result.stdout.count("defense/ft.py") == 3 and not (tmp_path / "logs" / "slurm").exists()
    assert not list(records.glob("*/defense"))


def _slurm_answers():
    if not shutil.which("sinfo"):
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def require_slurm():
    if not _slurm_answers():
        message = "no SLURM answers here (start one: sudo bash sh/slurm_local.sh)"
        if os.environ.get("REQUIRE_SLURM") == "1":
            pytest.fail(message + "; REQUIRE_SLURM=1")
        pytest.skip(message)


def test_a_sweep_on_real_slurm_gives_the_local_table(tmp_path):
    require_slurm()
    records = _world(tmp_path)
    shutil.copytree(records, tmp_path / "records_slurm")
    common = ["--defenses", "ft", "--timeout", "600"]  # one defense: each task is a fresh python (~5 s)
    passthrough = ["--", "--dataset_path", tmp_path / "data", "--device", "cpu", "--ratio", "0.5", "--epochs", "1"]
    local = run_script("sh/batch.py", *common, "--record_dir", records, "--log_dir", tmp_path / "local",
                       *passthrough, timeout=900)
    slurm = run_script("sh/batch.py", *common, "--record_dir", tmp_path / "records_slurm", "--log_dir",
                       tmp_path / "slurm", "--executor", "slurm", "--slurm_cpus_per_task", "1",
                       "--slurm_poll_seconds", "1", "--slurm_time_min", "10", *passthrough, timeout=900)
    for result in (local, slurm):
        assert result.returncode == 1, result.stdout + result.stderr  # the broken record fails, the rest run
    assert "submitted 3 task(s) as SLURM job array" in slurm.stdout
    assert "ran 2, skipped 0 (result exists), failed 1" in slurm.stdout
    failed = [line for line in slurm.stdout.splitlines() if line.startswith("  FAILED  broken/")]
    assert len(failed) == 1 and all(str(tmp_path / "slurm") in line for line in failed)
    assert "error:" in (tmp_path / "slurm" / "broken__ft.log").read_text()  # the defense's own message
    columns = ["attack", "defense", "acc", "asr", "ra", "der", "status"]
    ours = pd.read_csv(tmp_path / "local" / "summary.csv")[columns]
    theirs = pd.read_csv(tmp_path / "slurm" / "summary.csv")[columns]
    pd.testing.assert_frame_equal(ours, theirs)
    assert (ours["status"] == "ok").sum() == 2  # two records x one defense; `none` rows of tiny records: missing
    again = run_script("sh/batch.py", *common, "--record_dir", tmp_path / "records_slurm", "--log_dir",
                       tmp_path / "slurm2", "--executor", "slurm", "--slurm_poll_seconds", "1", *passthrough,
                       timeout=900)
    assert "skipped 2" in again.stdout and "submitted 1 task(s)" in again.stdout  # resumes: only the failed again


def test_an_attack_runs_through_the_same_executor(tmp_path):
    require_slurm()
    write_synthetic_cifar10(tmp_path / "data" / "cifar10", train_per_batch=40, test_count=60)
    record = tmp_path / "records" / "badnet_tiny"
    job = Job("attack badnet_tiny", [sys.executable, "attack/badnet.py", "--yaml_path",
                                     "config/attack/prototype/cifar10_cpu.yaml", "--bd_yaml_path",
                                     "config/attack/badnet/default.yaml", "--save_folder_name", "badnet_tiny",
                                     "--record_dir", str(tmp_path / "records"), "--dataset_path", str(tmp_path / "data"),
                                     "--epochs", "1", "--device", "cpu", "--progress", "False"],
              tmp_path / "logs" / "attack.log", record / "attack_result.pt")
    messages = []
    report = run_jobs([job], slurm=SlurmSettings(cpus_per_task=1, poll_seconds=1, time_min=10),
                      echo=messages.append)
    assert [name for name, _ in report.ran] == ["attack badnet_tiny"], job.log.read_text()
    assert (record / "summary.json").is_file() and any("SLURM task" in m for m in messages)
