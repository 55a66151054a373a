"""--jobs=N (recbole_perpeft/experiments/executor.py): a comparison's runs as subprocesses, N at once, with the
same per-run results as --jobs=1; a two-stage row waits for its seed's stage 1; a killed --jobs=2 comparison,
run again, reuses its finished runs and resumes the rest; a failing run is reported, the others finish."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from recbole_perpeft.resume import last_checkpoint_path
from tests.tiny import REPO_ROOT, RUN_SCRIPT, finish, make_atomic_dataset, make_tiny_clip, quick_config

DATASET = "jobs"


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("jobs")
    clip = make_tiny_clip(root / "clip")
    data = make_atomic_dataset(root / "data", DATASET, n_users=30, n_items=25)
    keys = quick_config(root, **data, foundation_model="clip", clip_path=clip.path, topk=[5, 10],
                        valid_metric="hit@10", learning_rate=1e-3, n_groups=2, peft_type="LORA",
                        stage1_epochs=1, stage2_epochs=1)  # fmt: skip
    keys.pop("checkpoint_dir")  # per comparison, on the command line
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(keys))
    return path


def compare(tmp_path, config_file, name: str, models: str, jobs: int, *more: str, log=None):
    """`compare` in a subprocess, in its own process group (a test can kill it whole); returns the Popen."""
    args = ["compare", f"--model={models}", f"--dataset={DATASET}", f"--config_files={config_file}", "--seeds=1,2",
            f"--checkpoint_dir={tmp_path / (name + '-saved')}", f"--result_file={tmp_path / (name + '.json')}",
            f"--jobs={jobs}", *more]  # fmt: skip
    log = log or tmp_path / f"{name}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(RUN_SCRIPT), *args], cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    proc.log = Path(log)
    return proc


def interrupted_runs(runs: Path) -> list[Path]:
    """Runs without a result JSON whose -last checkpoint exists (they have trained an epoch)."""
    return [record for record in runs.glob("*.checkpoint") if not record.with_suffix(".json").is_file()
            and Path(last_checkpoint_path(record.read_text().strip())).is_file()]  # fmt: skip


def run_results(tmp_path, name: str) -> dict:
    runs = tmp_path / f"{name}.runs"
    return {p.stem: json.loads(p.read_text()) for p in sorted(runs.glob("*-seed*.json"))}


def test_jobs_2_gives_the_results_of_jobs_1_run_by_run(tmp_path, config_file):
    one = finish(compare(tmp_path, config_file, "one", "SASRec,GlobalPEFT", 1))
    assert one.returncode == 0, one.stdout[-3000:]
    two = finish(compare(tmp_path, config_file, "two", "SASRec,GlobalPEFT", 2))
    assert two.returncode == 0, two.stdout[-3000:]
    assert "2 at a time" in two.stdout and two.stdout.count("] start ") == 4 and "4 of 4 ended (0 failed)" in two.stdout
    first, second = run_results(tmp_path, "one"), run_results(tmp_path, "two")
    assert sorted(first) == sorted(second) == ["GlobalPEFT-seed1", "GlobalPEFT-seed2", "SASRec-seed1", "SASRec-seed2"]
    for name in first:
        assert second[name]["test_result"] == first[name]["test_result"], name
        assert second[name]["best_valid_result"] == first[name]["best_valid_result"], name
        assert (tmp_path / "two.runs" / f"{name}.log").is_file()  # a log per run, beside its JSON
    assert json.loads((tmp_path / "two.json").read_text())["results"] == \
        json.loads((tmp_path / "one.json").read_text())["results"]  # fmt: skip


def test_a_two_stage_row_waits_for_its_seeds_stage1(tmp_path, config_file):
    done = finish(compare(tmp_path, config_file, "grouped", "PerPEFT,SharedGroupPEFT", 2))
    assert done.returncode == 0, done.stdout[-3000:]
    lines = done.stdout.splitlines()
    for seed in (1, 2):
        trained = next(i for i, line in enumerate(lines) if re.search(rf"done: PerPEFT seed {seed}\b", line))
        waited = next(i for i, line in enumerate(lines) if re.search(rf"start SharedGroupPEFT seed {seed}\b", line))
        assert waited > trained and "(stage 1 from " in lines[waited]
        runs = run_results(tmp_path, "grouped")
        shared = runs[f"SharedGroupPEFT-seed{seed}"]["global_checkpoint"]
        assert shared == runs[f"PerPEFT-seed{seed}"]["global_checkpoint"]


def test_a_killed_comparison_reuses_finished_runs_and_resumes_the_rest(tmp_path, config_file):
    args = ("SASRec,GlobalPEFT", 2, "--epochs=4")
    proc = compare(tmp_path, config_file, "killed", *args)
    runs = tmp_path / "killed.runs"
    deadline = time.monotonic() + 600
    # Kill the whole command (parent and its runs) once a run has finished and another has a -last checkpoint.
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.log.read_text()[-3000:]
        if list(runs.glob("*-seed*.json")) and interrupted_runs(runs):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = {p.name: p.stat().st_mtime_ns for p in runs.glob("*-seed*.json")}
    assert kept, "no run finished before the kill"
    again = finish(compare(tmp_path, config_file, "killed", *args, log=tmp_path / "again.log"))
    assert again.returncode == 0, again.stdout[-3000:]
    assert again.stdout.count(": reusing ") >= len(kept)
    assert {p: (runs / p).stat().st_mtime_ns for p in kept} == kept  # finished runs not redone
    assert "(resuming " in again.stdout  # an interrupted run went on from its checkpoint
    assert len(list(runs.glob("*-seed*.json"))) == 4


def test_a_failing_run_is_reported_and_the_others_finish(tmp_path, config_file):
    # GlobalPEFT with a foundation model that cannot be read fails; SASRec does not read it.
    done = finish(compare(tmp_path, config_file, "fails", "SASRec,GlobalPEFT", 2, f"--clip_path={tmp_path / 'nope'}"))
    assert done.returncode != 0
    runs = tmp_path / "fails.runs"
    assert sorted(p.name for p in runs.glob("*-seed*.json")) == ["SASRec-seed1.json", "SASRec-seed2.json"]
    report = done.stdout[done.stdout.index("2 of 4 runs failed:"):]
    for seed in (1, 2):
        log = runs / f"GlobalPEFT-seed{seed}.log"
        last = [line.strip() for line in log.read_text().splitlines() if line.strip()][-1]
        assert f"GlobalPEFT seed {seed}: exit status 1, last log line: {last}" in report
    assert "retry them with the same command" in report


def test_the_speed_bench_smoke_mode_times_both_and_finds_the_runs_identical(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "executor_speed.py"), "--tiny",
                           f"--out={tmp_path}"], env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = re.search(r"--jobs=1: ([\d.]+) s; --jobs=2: ([\d.]+) s; ratio ([\d.]+)x; per-run test results identical: "
                     r"True", done.stdout)  # fmt: skip
    assert line, done.stdout[-3000:]
    report = json.loads((tmp_path / "executor_speed.json").read_text())
    assert report["identical"] is True and report["ratio"] == pytest.approx(float(line[2]) / float(line[1]), rel=0.01)
    assert len(list((tmp_path / "jobs2" / "comparison.runs").glob("*-seed*.json"))) == 4
