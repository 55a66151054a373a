"""Wall-clock of one small comparison with --jobs=1 and --jobs=2 (recbole_perpeft/experiments/executor.py),
in one run: GlobalPEFT and FrozenMM x 2 seeds with IISAN on multimodal ml-100k (4 runs).

    python bench/executor_speed.py [--jobs=2] [--user_sample_ratio=0.3] [--epochs=2] [--image_dir=DIR] [--key=value ...]
    python bench/executor_speed.py --tiny     # smoke mode: a generated dataset and a tiny CLIP

Each setting trains every run afresh into its own folder (out/jobs<N>/), --jobs=N first (the caches both share
in out/cache are built cold by it, not by --jobs=1: the ratio errs against --jobs=N; run it twice for the
figure with the caches built), the same command
otherwise; prints the seconds of each, their ratio (jobs N / jobs 1) and whether every run's test result is
identical, and writes out/executor_speed.json. Run it on a quiet machine: other CPU jobs distort the timings
(the load average is printed)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
POSTERS = ROOT.parent / "shared" / "datasets" / "ml-100k-posters" / "images"


def comparison(args, out: Path, jobs: int, setting: list[str]) -> float:
    """Seconds of ``compare ... --jobs=jobs`` in a fresh folder (its output in out/jobs<N>.log)."""
    folder = out / f"jobs{jobs}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    command = [sys.executable, str(ROOT / "run_recbole_perpeft.py"), "compare", "--model=GlobalPEFT,FrozenMM",
               "--seeds=2", f"--result_file={folder / 'comparison.json'}", f"--checkpoint_dir={folder / 'saved'}",
               f"--jobs={jobs}", *setting]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.monotonic()
    with open(out / f"jobs{jobs}.log", "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=out)
    seconds = time.monotonic() - start
    if done.returncode:
        sys.exit(f"--jobs={jobs} failed (exit {done.returncode}): see {out / f'jobs{jobs}.log'}")
    return seconds


def test_results(out: Path, jobs: int) -> dict:
    runs = out / f"jobs{jobs}" / "comparison.runs"
    return {p.stem: json.loads(p.read_text())["test_result"] for p in sorted(runs.glob("*-seed*.json"))}


def tiny_setting(out: Path) -> list[str]:
    import yaml

    from tests.tiny import make_atomic_dataset, make_tiny_clip, quick_config

    clip = make_tiny_clip(out / "clip")
    data = make_atomic_dataset(out / "data", "tinybench", n_users=30, n_items=25)
    keys = quick_config(out, **data, foundation_model="clip", clip_path=clip.path, topk=[5, 10],
                        valid_metric="hit@10", peft_type="IISAN")  # fmt: skip
    keys.pop("checkpoint_dir")
    (out / "tiny.yaml").write_text(yaml.safe_dump(keys))
    return ["--dataset=tinybench", f"--config_files={out / 'tiny.yaml'}"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--user_sample_ratio", type=float, default=0.3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--image_dir", default=str(POSTERS) if POSTERS.is_dir() else None)
    parser.add_argument("--tiny", action="store_true", help="smoke mode: generated data, tiny CLIP")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "executor_speed"))
    args, rest = parser.parse_known_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        setting = tiny_setting(out)
    else:
        if args.image_dir is None:
            print("No posters found (pass --image_dir): the comparison runs text-only.", file=sys.stderr)
        setting = ["--dataset=ml-100k", "--peft_type=IISAN", f"--user_sample_ratio={args.user_sample_ratio}",
                   *([f"--image_dir={args.image_dir}"] if args.image_dir else [])]  # fmt: skip
    setting += [f"--epochs={args.epochs}", f"--cache_dir={out / 'cache'}", "--show_progress=False", *rest]
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"cores: {os.cpu_count()}, load average before: {load}", flush=True)
    # --jobs=N first: a cache the runs build cold (hidden states, encoded items; out/cache) costs it, not --jobs=1.
    seconds = {args.jobs: comparison(args, out, args.jobs, setting)}
    seconds[1] = comparison(args, out, 1, setting)
    same = test_results(out, 1) == test_results(out, args.jobs)
    ratio = seconds[args.jobs] / seconds[1]
    print(f"--jobs=1: {seconds[1]:.1f} s; --jobs={args.jobs}: {seconds[args.jobs]:.1f} s; "
          f"ratio {ratio:.2f}x; per-run test results identical: {same}", flush=True)  # fmt: skip
    print(f"load average after: {os.getloadavg() if hasattr(os, 'getloadavg') else None}", flush=True)
    report = {"setting": setting, "seconds": seconds, "ratio": ratio, "identical": same, "cores": os.cpu_count(),
              "load_before": load}  # fmt: skip
    (out / "executor_speed.json").write_text(json.dumps(report, indent=2))
    if not same:
        sys.exit("the per-run test results of --jobs=1 and --jobs=N differ")


if __name__ == "__main__":
    main()
