"""Seconds per training epoch of one run in 1 and in N processes (recbole_perpeft/distributed.py: gloo on a
CPU, NCCL on GPUs), the same global batch, and whether the results agree.

    python bench/ddp_speed.py [--tiny] [--nprocs=1,2] [--model=GlobalPEFT] [--dataset=ml-100k]
        [--peft_type=IISAN] [--epochs=2] [--workdir=DIR] [--key=value ...]

Each run trains ``--epochs`` epochs (PerPEFT: ``stage1_epochs`` / ``stage2_epochs``, given as keys) with every
``--key=value`` given and reports the mean seconds of its training epochs (the first one included: the same
for every number of processes). Dropout is switched off (``hidden_dropout_prob``, ``attn_dropout_prob``,
``projector_dropout`` 0, unless given), since each process draws its own masks: with it off, the runs'
metrics must agree (printed side by side). On a CPU the processes share the machine's cores (each gets
cores / N threads), so expect little gain on a 2-core machine; the point there is correctness. On a loaded
machine a process with several OpenMP threads can lose many times its speed to busy-waiting: compare with
``OMP_NUM_THREADS=1`` (one thread for every process) before reading a speed-up. ``--tiny``:
a generated dataset and a tiny CLIP (timings mean nothing; a smoke run). Run it alone on an idle machine for
figures worth quoting."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attn_dropout_prob": 0.0, "projector_dropout": 0.0}


def tiny_keys(work: Path) -> tuple[str, dict]:
    from tests.tiny import make_atomic_dataset, make_tiny_clip, quick_config

    clip = make_tiny_clip(work / "clip")
    data = make_atomic_dataset(work / "data", "ddpbench", n_users=60, n_items=30)
    keys = quick_config(work, **data, foundation_model="clip", clip_path=clip.path, topk=[5, 10], valid_metric="hit@10")
    return "ddpbench", keys


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def epoch_seconds(result: dict) -> list[float]:
    seconds = result["seconds"]
    if seconds.get("per_epoch"):
        return list(seconds["per_epoch"])
    return [*seconds.get("stage1_per_epoch", []), *seconds.get("stage2_per_epoch", [])]  # two-stage models


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--nprocs", default="1,2")
    parser.add_argument("--model", default="GlobalPEFT")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--peft_type", default="IISAN")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workdir", default=None)
    args, rest = parser.parse_known_args(argv)
    from recbole_perpeft.cli import flow_value
    from recbole_perpeft.quick_start import run

    work = Path(args.workdir or tempfile.mkdtemp(prefix="ddp-speed-"))
    dataset, keys = tiny_keys(work) if args.tiny else (args.dataset, {})
    keys.update(NO_DROPOUT, peft_type=args.peft_type, epochs=args.epochs, show_progress=False)
    for arg in rest:
        key, _, value = arg.removeprefix("--").partition("=")
        keys[key] = flow_value(value)
    import torch

    rows = []
    for nproc in [int(n) for n in args.nprocs.split(",")]:
        overrides = dict(keys, nproc=nproc, checkpoint_dir=str(work / f"saved-{nproc}"))
        result = run(args.model, dataset, config_dict=overrides)
        seconds = epoch_seconds(result)
        # (launch.py gives each spawned process cores / nproc threads unless OMP_NUM_THREADS says otherwise)
        threads = torch.get_num_threads() if nproc == 1 else os.environ.get("OMP_NUM_THREADS", cores() // nproc)
        rows.append((nproc, threads, statistics.mean(seconds), len(seconds), result["test_result"]))
        batch = result["config"]["train_batch_size"]
    base = rows[0][2]
    print(f"\n{args.model} ({args.peft_type}) on {dataset}, global batch {batch}, {cores()} cores")
    print(f"{'processes':>9} | {'threads each':>12} | {'s / epoch':>9} | {'speed-up':>8} | {'epochs':>6} | test result")
    for nproc, threads, mean, count, test in rows:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in test.items())
        print(f"{nproc:>9} | {threads:>12} | {mean:>9.2f} | {base / mean:>8.2f} | {count:>6} | {shown}")
    same = all(row[3] == rows[0][3] for row in rows)
    print("test results " + ("identical" if same else "differ (float noise can break a tie: compare closely)"))


if __name__ == "__main__":
    main()
