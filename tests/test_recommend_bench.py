"""bench/recommend_speed.py's smoke mode runs end to end and reports every figure and ratio (its speed is
the bench's to print, not a test's to assert)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.tiny import REPO_ROOT


def test_tiny_mode_prints_and_writes_every_figure(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "recommend_speed.py"), "--tiny", f"--out={tmp_path}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "recommend_speed.json").read_text())
    assert set(report["rows"]) == {"full/known", "full/new", "export/known", "export/new"}
    assert all(row["per_second"] > 0 for row in report["rows"].values())
    assert report["requests"] == 200 and report["model"] == "FrozenMM"
    for key, ratio in report["ratios"].items():
        assert ratio > 0 and f"ratio {key}: {ratio:.2f}x" in proc.stdout
