"""``bench/stage2_speed.py --tiny`` runs end to end on a CPU and prints, for both settings and both peft types,
the stage-2 / stage-1 epoch ratio with its spread and the work counts. No timing is asserted: tiny models'
timings mean nothing (the bench's real figures are in docs/performance.md)."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.test_lora_speed_bench import offline_env
from tests.tiny import REPO_ROOT

BENCH = REPO_ROOT / "bench" / "stage2_speed.py"
NUMBER = r"(\d+(?:\.\d+)?)"


def test_tiny_bench_prints_the_ratio_for_every_setting_and_peft(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCH), "--tiny", "--repeats=1", f"--workdir={tmp_path}"],
        cwd=tmp_path, env=offline_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = result.stdout.split("PerPEFT stage 2 / stage 1 per training epoch")[-1]
    seconds = rf"\s+{NUMBER}/{NUMBER}\s+{NUMBER}\s+{NUMBER}-{NUMBER}"  # stage 1/2, ratio, spread
    pattern = rf"^(small|large)\s+(LORA|IISAN)\s+(\d+)\s+(\d+)/(\d+)\s+(\d+)/(\d+)\s+(\d+)/(\d+){seconds}{seconds}$"
    rows = {(m[1], m[2]): m for m in re.finditer(pattern, table, flags=re.M)}
    assert set(rows) == {(s, p) for s in ("small", "large") for p in ("LORA", "IISAN")}, result.stdout[-3000:]
    for row in rows.values():
        steps1, steps2, partial1, partial2 = (int(row[i]) for i in (4, 5, 6, 7))
        # Stage 2's batches are group-homogeneous: at least as many steps, each group may end in a partial one.
        assert steps2 >= steps1 and partial2 >= partial1
        for wall_or_cpu in (10, 15):  # stage-1 s, stage-2 s, ratio, lowest, highest
            first, second, ratio, low, high = (float(row[wall_or_cpu + i]) for i in range(5))
            assert low <= high and ratio > 0
    for setting in ("small", "large"):
        for peft in ("LORA", "IISAN"):
            assert re.search(rf"^  {setting} {peft}: lora_bench, \w+, group sizes \[", result.stdout, flags=re.M)
