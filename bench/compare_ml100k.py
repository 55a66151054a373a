"""PerPEFT vs GlobalPEFT (LoRA) vs FrozenMM vs SASRec on multimodal ml-100k: test metrics and
seconds per training epoch.

    python bench/compare_ml100k.py [--image_dir=DIR] [--epochs=5] [--user_sample_ratio=1.0] [--key=value ...]

Same seed, data, split and epochs for every model; PerPEFT starts from the GlobalPEFT run's
checkpoint (its stage 1) and trains --epochs stage-2 epochs. Prints one table (metrics x100, seconds
per training epoch, and each model's epoch time as a ratio to GlobalPEFT's) and writes bench/results/.
Posters default to ../shared/datasets/ml-100k-posters/images when that folder exists."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
POSTERS = ROOT.parent / "shared" / "datasets" / "ml-100k-posters" / "images"
MODELS = ["GlobalPEFT", "PerPEFT", "FrozenMM", "SASRec"]
METRICS = ["hit@20", "ndcg@20", "hit@30", "ndcg@30"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--image_dir", default=str(POSTERS) if POSTERS.is_dir() else None)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--user_sample_ratio", type=float, default=1.0)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--rerun", action="store_true", help="train models whose result JSON already exists")
    args, rest = parser.parse_known_args()
    if args.image_dir is None:
        print("No posters found (pass --image_dir): this comparison runs text-only.", file=sys.stderr)
    from recbole_perpeft.quick_start import run

    overrides = dict(arg[2:].split("=", 1) for arg in rest)
    overrides.update(epochs=args.epochs, user_sample_ratio=args.user_sample_ratio, show_progress=False,
                     checkpoint_dir=os.path.join(args.out, "saved"))
    if args.image_dir:
        overrides["image_dir"] = args.image_dir
    os.makedirs(args.out, exist_ok=True)
    results = {}
    for model in args.models.split(","):
        done = os.path.join(args.out, f"{model}.json")
        if os.path.isfile(done) and not args.rerun:
            print(f"{model}: reusing {done} (pass --rerun to train it again)", file=sys.stderr)
            with open(done) as f:
                results[model] = json.load(f)
            continue
        extra = {}
        if model == "PerPEFT":
            if "GlobalPEFT" not in results:
                sys.exit("PerPEFT here starts from the GlobalPEFT run: list GlobalPEFT before it in --models.")
            extra = {"global_checkpoint": results["GlobalPEFT"]["checkpoint"], "stage2_epochs": args.epochs}
        results[model] = run(model, "ml-100k", config_dict=dict(overrides, **extra),
                             result_file=os.path.join(args.out, f"{model}.json"))

    base_seconds = results.get("GlobalPEFT", next(iter(results.values())))["seconds"]
    base = statistics.mean(base_seconds.get("per_epoch") or base_seconds.get("stage2_per_epoch") or [1])
    print(f"\nml-100k, user_sample_ratio={args.user_sample_ratio}, epochs={args.epochs}, "
          f"image_dir={'posters' if args.image_dir else 'none (text-only)'}")
    print("| model | " + " | ".join(METRICS) + " | s/epoch | epoch time / GlobalPEFT |")
    print("|---" * (len(METRICS) + 3) + "|")
    for model, res in results.items():
        seconds = res["seconds"]
        per_epoch = seconds.get("per_epoch") or seconds.get("stage2_per_epoch") or [seconds["train"] / args.epochs]
        sec = statistics.mean(per_epoch)
        cells = " | ".join(f"{100 * res['test_result'][m]:.2f}" for m in METRICS)
        print(f"| {model} | {cells} | {sec:.1f} | {sec / base:.2f} |")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({m: {"test": r["test_result"], "seconds": r["seconds"]} for m, r in results.items()}, f, indent=2)


if __name__ == "__main__":
    main()
