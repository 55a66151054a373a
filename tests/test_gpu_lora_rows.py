"""``bench/gpu_lora_rows.sh`` starts one reproduce process per (job, seed), each with its own run folder and
checkpoints and the extra keys passed through. A stand-in PYTHON records each command line instead of training
(a real run is a GPU's work: docs/performance.md, "Speed on one GPU")."""

from __future__ import annotations

import os
import subprocess

from tests.tiny import REPO_ROOT

SCRIPT = REPO_ROOT / "bench" / "gpu_lora_rows.sh"


def run_script(tmp_path, *args, **env):
    fake = tmp_path / "fake-python"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    full_env = {**os.environ, "PYTHON": str(fake), **env}
    return subprocess.run(["bash", str(SCRIPT), *args], env=full_env, capture_output=True, text=True, timeout=60)


def test_one_process_per_job_and_seed_with_its_own_folder_and_the_extra_keys(tmp_path):
    out = tmp_path / "rows"
    done = run_script(tmp_path, str(out), "--adapt_layers=2", SEEDS="2024 2025", JOBS="GlobalPEFT PerPEFT2soft")
    assert done.returncode == 0, done.stderr
    logs = sorted(p.name for p in out.glob("*.log"))
    assert logs == ["GlobalPEFT-2024.log", "GlobalPEFT-2025.log", "PerPEFT2soft-2024.log", "PerPEFT2soft-2025.log"]
    line = (out / "PerPEFT2soft-2025.log").read_text().split()
    assert line[:2] == ["-m", "recbole_perpeft.reproduce"]
    folder = out / "PerPEFT2soft-2025"
    for arg in ("--table=2", "--dataset=amazon-scientific", "--peft=LORA", "--stage1_epochs=10", "--stage2_epochs=20",
                "--rows=PerPEFT", "--n_groups=2", "--soft_groups=2", "--seeds=2025,", f"--result_dir={folder}",
                f"--checkpoint_dir={folder}/saved", "--adapt_layers=2"):  # fmt: skip
        assert arg in line, arg
    assert "--rows=GlobalPEFT" in (out / "GlobalPEFT-2024.log").read_text().split()


def test_peft_chooses_the_peft_type_of_every_row(tmp_path):
    out = tmp_path / "rows"
    done = run_script(tmp_path, str(out), SEEDS="2024", JOBS="GlobalPEFT", PEFT="IA3")
    assert done.returncode == 0, done.stderr
    line = (out / "GlobalPEFT-2024.log").read_text().split()
    assert "--peft=IA3" in line and "--peft=LORA" not in line


def test_unknown_job_and_missing_folder_are_refused(tmp_path):
    done = run_script(tmp_path, str(tmp_path / "rows"), JOBS="Global")
    assert done.returncode == 2 and "unknown job 'Global'" in done.stderr
    done = run_script(tmp_path)
    assert done.returncode == 2 and "usage" in done.stderr
