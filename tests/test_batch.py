"""Batch runs (utils/batch.py, sh/batch.py) and the benchmark table (utils/benchmark.py) on fabricated folders."""
import json
import sys

import pandas as pd
import pytest

from fakes import fake_record
from helpers import run_script
from utils.batch import Job, defense_job, defense_yaml, record_names, run_jobs
from utils.benchmark import best_marks, collect, markdown, write_outputs
from utils.errors import UserError


def _job(tmp_path, name, code="", creates_result=True):
    result = tmp_path / name / "summary.json"
    body = (f"import pathlib; p = pathlib.Path({str(result)!r}); p.parent.mkdir(parents=True, exist_ok=True); "
            + ("p.write_text('{}'); " if creates_result else "") + code)
    return Job(name=name, command=[sys.executable, "-c", body], log=tmp_path / "logs" / f"{name}.log", result=result)


def test_existing_results_are_skipped_failures_do_not_stop_the_batch(tmp_path):
    done = _job(tmp_path, "done", code="pathlib.Path('should_not_run').touch()")
    done.result.parent.mkdir(parents=True)
    done.result.write_text("{}")
    failing = _job(tmp_path, "failing", code="print('boom'); raise SystemExit(3)", creates_result=False)
    silent = _job(tmp_path, "no_result", creates_result=False)
    good = _job(tmp_path, "good")
    messages = []
    report = run_jobs([done, failing, silent, good], echo=messages.append)
    assert report.skipped == ["done"]
    assert [name for name, _ in report.ran] == ["good"]
    assert [(name, code) for name, code, _ in report.failed] == [("failing", 3), ("no_result", "0, but no result file")]
    assert "boom" in failing.log.read_text() and failing.log.read_text().startswith("$ ")
    assert not done.log.exists()
    assert any("FAILED" in line for line in report.lines())
    assert len(messages) >= 4


def test_force_reruns_and_timeout_counts_as_failure(tmp_path):
    job = _job(tmp_path, "again")
    job.result.parent.mkdir(parents=True)
    job.result.write_text("old")
    assert [name for name, _ in run_jobs([job], force=True, echo=lambda _: None).ran] == ["again"]
    slow = _job(tmp_path, "slow", code="import time; time.sleep(30)")
    report = run_jobs([slow], timeout=1, echo=lambda _: None)
    assert report.failed[0][1] == "timeout" and "--timeout" in slow.log.read_text()


def test_defense_job_command_and_yaml(tmp_path):
    job = defense_job("ulrl", "badnet_cpu", tmp_path, tmp_path / "logs", "cifar10", ["--eval_every", 5])
    assert job.command[-2:] == ["--eval_every", "5"]
    assert job.command[job.command.index("--yaml_path") + 1] == "config/defense/ulrl/cifar10.yaml"
    assert job.result == tmp_path.resolve() / "badnet_cpu" / "defense" / "ulrl" / "summary.json"
    assert defense_yaml("ft", "mnist") == "config/defense/ft/mnist.yaml"
    assert defense_yaml("ft", "an_image_folder") == "config/defense/ft/config.yaml"  # no YAML of its own
    with pytest.raises(UserError, match="unknown defense"):
        defense_job("nonexistent", "r", tmp_path, tmp_path)


def test_batch_cli_skips_existing_reports_failures_and_exits_1(tmp_path):
    fake_record(tmp_path, "r1", defenses={"ft": (0.9, 0.1, 0.8, 0.9, 10.0)})
    fake_record(tmp_path, "r2")
    assert record_names(tmp_path) == ["r1", "r2"]
    result = run_script("sh/batch.py", "--defenses", "ft", "--record_dir", tmp_path, "--log_dir", tmp_path / "logs",
                        timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "skipped r1/ft" in result.stdout and "FAILED  r2/ft" in result.stdout
    summary = pd.read_csv(tmp_path / "logs" / "batch_summary.csv")
    assert list(summary["status"]) == ["skipped", "failed (exit 2)"]
    assert "error:" in (tmp_path / "logs" / "r2__ft.log").read_text()  # the defense's one clear message
    assert not (tmp_path / "r2" / "defense" / "ft").exists()  # nothing half-written
    assert "| r1 | ft | **0.9000** | **0.1000** | **0.8000** | **0.9000** | **10.0** |" in result.stdout  # old results tabled
    assert "| r2 | ft (missing) |" in (tmp_path / "logs" / "summary.md").read_text()
    assert "| record | defense | ACC |" in result.stdout and "records under" not in result.stdout


def test_hidden_partial_folders_are_not_records(tmp_path):
    fake_record(tmp_path, "r1")
    fake_record(tmp_path, ".r2.partial-123")
    assert record_names(tmp_path) == ["r1"]


def test_a_run_with_eval_limit_is_shown_but_never_compared(tmp_path):
    folder = fake_record(tmp_path, "badnet_cpu", {"test_acc": 0.85, "test_asr": 0.96, "test_ra": 0.03},
                          {"ft": (0.84, 0.10, 0.80, 0.925, 60.0), "ulrl": (0.90, 0.00, 0.90, 0.98, 5.0)})
    summary_path = folder / "defense" / "ulrl" / "summary.json"
    summary_path.write_text(json.dumps({**json.loads(summary_path.read_text()), "eval_limit": 500}))
    table = collect({"badnet": folder}, ["none", "ft", "ulrl"])
    marks = best_marks(table)
    ulrl = table.index[table["defense"] == "ulrl"][0]
    ft = table.index[table["defense"] == "ft"][0]
    assert not any(index == ulrl for index, _ in marks)
    assert (ft, "asr") in marks and (ft, "acc") in marks
    assert "ulrl (ok (eval_limit 500)) | 0.9000 | 0.0000 |" in markdown(table)


def test_batch_cli_rejects_a_folder_that_is_not_a_record(tmp_path):
    result = run_script("sh/batch.py", "--defenses", "ft", "--records", "absent", "--record_dir", tmp_path)
    assert result.returncode == 2 and "not a record folder" in result.stderr


def test_table_marks_the_best_defense_per_attack_and_keeps_missing_cells(tmp_path):
    records = {
        "badnet": fake_record(tmp_path, "badnet_cpu", {"test_acc": 0.85, "test_asr": 0.96, "test_ra": 0.03},
                               {"ft": (0.84, 0.10, 0.80, 0.925, 60.0), "ulrl": (0.82, 0.02, 0.85, 0.955, 20.0)}),
        "blended": fake_record(tmp_path, "blended_cpu", {"test_acc": 0.86, "test_asr": 0.99, "test_ra": 0.01},
                                {"ft": (0.85, 0.50, 0.40, 0.74, 50.0)}),
    }
    table = collect(records, ["none", "ft", "ulrl"])
    assert len(table) == 6
    missing = table[(table["attack"] == "blended") & (table["defense"] == "ulrl")].iloc[0]
    assert missing["status"] == "missing" and pd.isna(missing["acc"])
    none = table[(table["attack"] == "badnet") & (table["defense"] == "none")].iloc[0]
    assert (none["acc"], none["asr"], none["seconds"]) == (0.85, 0.96, 100.0)
    marks = best_marks(table)
    row = {(r.attack, r.defense): i for i, r in table.iterrows()}
    assert (row["badnet", "ulrl"], "asr") in marks and (row["badnet", "ft"], "acc") in marks
    assert (row["badnet", "none"], "acc") not in marks  # the backdoored model is not a defense
    text = markdown(table, "title")
    assert "| badnet | ulrl | 0.8200 | **0.0200** |" in text and "ulrl (missing)" in text
    write_outputs(table, tmp_path / "bench", "title")
    assert pd.read_csv(tmp_path / "bench" / "summary.csv").shape == (6, 9)
    assert (tmp_path / "bench" / "summary.png").stat().st_size > 1000


def test_none_row_of_a_backdoorbench_record_comes_from_its_attack_df_summary():
    from conftest import SHARED_RECORDS, require_shared_record
    require_shared_record("badnet_0_1")
    from utils.benchmark import attack_metrics
    metrics = attack_metrics(SHARED_RECORDS / "badnet_0_1")
    assert metrics["test_acc"] == pytest.approx(0.5356) and metrics["test_asr"] == pytest.approx(0.1351, abs=1e-4)


def test_benchmark_resumes_from_existing_records_and_results(tmp_path):
    fake_record(tmp_path, "badnet_cpu", {"test_acc": 0.85, "test_asr": 0.96, "test_ra": 0.03},
                 {"ft": (0.84, 0.10, 0.80, 0.925, 60.0)})
    result = run_script("sh/benchmark.py", "--scale", "cpu", "--seeds", "0", "--attacks", "badnet", "--defenses",
                        "none", "ft", "--record_dir", tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ran 0, skipped 2" in result.stdout  # the record and the ft result were reused
    assert "| badnet | ft | 0.840 | 0.100 | 0.800 | 0.925 | 60.0 | 1 |" in result.stdout
    assert "Scale: cpu, a small network" in result.stdout
    assert "1 of 1 verdicts agree" in result.stdout  # badnet x ft: removes here and on the leaderboard
    out = tmp_path / "benchmark" / "cpu"
    assert (out / "summary.md").read_text() in result.stdout
    assert (out / "asr_heatmap.png").stat().st_size > 1000 and len(pd.read_csv(out / "runs.csv")) == 2
    info = json.loads((out / "benchmark.json").read_text())
    assert info["scale"] == "cpu" and info["defenses"] == ["none", "ft"] and "cores" in info["machine"]
    assert info["seeds"] == [0]
    unknown = run_script("sh/benchmark.py", "--scale", "cpu", "--defenses", "ft", "nosuchdefense", "--record_dir",
                         tmp_path, timeout=300)  # a typo stops before hours of training, naming the registered ones
    assert unknown.returncode == 2 and "invalid choice: 'nosuchdefense'" in unknown.stderr and "'ulrl'" in unknown.stderr


def test_benchmark_recipe_names_the_candidates_records_and_outputs(tmp_path):
    recipe = "config/attack/prototype/proxy_candidates/c1_onecycle_lr0.2.yaml"
    result = run_script("sh/benchmark.py", "--scale", "proxy", "--recipe", recipe, "--seeds", "0", "1", "--attacks",
                        "badnet", "--defenses", "none", "clp", "--record_dir", tmp_path, "--dry_run", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"--yaml_path {recipe} " in result.stdout  # the candidate trains, not the scale's own recipe
    for name in ("badnet_proxy_c1_onecycle_lr0.2", "badnet_proxy_c1_onecycle_lr0.2_seed1"):
        assert f"would run attack {name}:" in result.stdout and f"would run {name}/clp:" in result.stdout
    missing = run_script("sh/benchmark.py", "--scale", "proxy", "--recipe", "no/such.yaml", "--record_dir", tmp_path,
                         timeout=300)
    assert missing.returncode != 0 and "--recipe no/such.yaml: no such file" in missing.stderr


def test_paper_scale_runs_unchanged_at_a_toy_size(tmp_path):
    """The paper-scale command itself (PreAct-ResNet18, BackdoorBench's recipe) on a synthetic CIFAR-10 of 200
    training images for one epoch: records, defenses, the table, its score, and a label saying it is a smoke test."""
    from helpers import write_synthetic_cifar10
    write_synthetic_cifar10(tmp_path / "data" / "cifar10")
    result = run_script("sh/benchmark.py", "--scale", "paper", "--epochs", "1", "--dataset_path", tmp_path / "data",
                        "--seeds", "0", "--attacks", "badnet", "--defenses", "none", "clp",
                        "--record_dir", tmp_path / "record", timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "record" / "badnet_paper" / "attack_result.pt").is_file()
    assert (tmp_path / "record" / "badnet_paper" / "defense" / "clp" / "summary.json").is_file()
    assert "Scale: paper (PreAct-ResNet18" in result.stdout and "SMOKE TEST, not this scale: 1 attack epochs" in result.stdout
    assert "of 1 verdicts agree" in result.stdout  # badnet x clp is a leaderboard cell
    info = json.loads((tmp_path / "record" / "benchmark" / "paper" / "benchmark.json").read_text())
    assert info["epochs"] == 1 and info["scale"] == "paper"
