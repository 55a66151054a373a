"""``bench/lora_speed.py --tiny`` (and ``bench/gpu_check.sh --tiny``, which calls it) run end to end on a CPU
and print every figure of the table for both setups. No timing is asserted: tiny models' timings mean nothing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.tiny import REPO_ROOT

BENCH = REPO_ROOT / "bench" / "lora_speed.py"
GPU_CHECK = REPO_ROOT / "bench" / "gpu_check.sh"
ROWS = [
    "step s, trim to longest",
    "step s, length buckets",
    "step buckets / trim to longest",
    "encoder fwd+bwd s, same items",
    "step / encoder fwd+bwd",
    "item table s,",
    "encoder inference s,",
    "item table / encoder inference",
    "peak memory MiB",
    "tokens real",
    "tokens padded, trim to longest",
    "tokens padded, length buckets",
    "epoch s GlobalPEFT",
    "epoch s PerPEFT stage 2",
    "epoch PerPEFT / GlobalPEFT",
]


def offline_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}


def check_table(stdout: str) -> None:
    blocks = re.split(r"^== ", stdout, flags=re.M)[1:]
    assert [b.split(":")[0] for b in blocks] == ["pair", "clip"], stdout
    for block in blocks:
        assert "fp32" in block and "bf16" in block and "bf16/fp32" in block
        for row in ROWS:
            lines = [line for line in block.splitlines() if line.startswith(row)]
            assert len(lines) == 1, f"row {row!r} missing or repeated:\n{block}"
            assert re.search(r"\d", lines[0][len(row) :]), f"no figure in {lines[0]!r}"
        bucketed = next(line for line in block.splitlines() if line.startswith("tokens padded, length buckets"))
        assert float(re.search(r"([\d.]+)x real", bucketed).group(1)) <= 1.1


def test_tiny_bench_prints_every_row_for_both_setups(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCH), "--tiny", f"--workdir={tmp_path}"],
        cwd=tmp_path, env=offline_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check_table(result.stdout)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_script_runs_the_tiny_bench_on_a_cpu(tmp_path):
    result = subprocess.run(
        ["bash", str(GPU_CHECK), "--tiny", "--setups=clip", "--no_epochs", f"--workdir={tmp_path}"],
        cwd=tmp_path, env=offline_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "GPU memory" in result.stdout
    assert "== clip:" in result.stdout and "step s, length buckets" in result.stdout


def test_stage2_speed_bench_alternates_epochs_and_prints_the_ratio(tmp_path, monkeypatch, capsys):
    """``bench/stage2_speed.py`` on a tiny dataset and CLIP, in-process: every epoch line and the ratio row."""
    from tests.tiny import make_atomic_dataset, make_tiny_clip, two_stage_keys

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO_ROOT / "bench"))
    import stage2_speed

    keys = two_stage_keys(tmp_path, make_atomic_dataset(tmp_path / "data", "stagespeedds"),
                          make_tiny_clip(tmp_path / "clip").path)  # fmt: skip
    keys.pop("n_groups")  # the bench's own --n_groups
    argv = ["--dataset=stagespeedds", "--peft=IISAN,LORA", "--repeats=2", "--n_groups=2", "--profile"]
    stage2_speed.main(argv + [f"--{k}={v}" for k, v in keys.items() if not isinstance(v, (dict, list))]
                      + [f"--{k}={v!r}" for k, v in keys.items() if isinstance(v, (dict, list))])  # fmt: skip
    out = capsys.readouterr().out
    for peft in ("IISAN", "LORA"):
        assert f"[custom {peft}] epoch 2: stage 1 (GlobalPEFT)" in out
        assert f"[custom {peft}] PerPEFT: profiled epoch" in out and "(collate_fn)" in out and "(activate)" in out
        row = re.search(rf"^custom\s+{peft}\s+\d+\s+\d+/\d+\s+\d+/\d+\s+\d+/\d+\s+([\d.]+)/([\d.]+)\s+([\d.]+)\s",
                        out, re.M)  # fmt: skip
        assert row, out
        global_s, perpeft_s, ratio = (float(row.group(i)) for i in (1, 2, 3))
        assert global_s > 0 and perpeft_s > 0
        # The printed seconds are rounded to 0.01: the ratio of the medians lies within what that rounding allows.
        low, high = (perpeft_s - 0.005) / (global_s + 0.005), (perpeft_s + 0.005) / max(global_s - 0.005, 1e-9)
        assert low - 0.005 <= ratio <= high + 0.005
