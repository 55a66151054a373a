"""Seconds per training epoch of each adapter family under GlobalPEFT, on multimodal ml-100k with the
real MiniLM + EfficientNet-Lite0 pair: LoRA, (IA)3 and MoDA inside the text encoder vs the IISAN and
CROSSAN side networks over cached hidden states.

    python bench/adapter_speed_ml100k.py [--epochs=1] [--user_sample_ratio=1.0] [--types=LORA,IA3,MODA,IISAN,CROSSAN]

Every type sees the same users, batches and seed. The side networks' hidden-state cache is built
cold for the first side network (its build time is printed) and reused by the next. Prints one
table (epoch seconds, ratio to LoRA's, validation hit@30 after the epochs, evaluation seconds) and
writes bench/results/adapter_speed.json. Run it alone: other CPU jobs distort the timings."""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
from pathlib import Path
from time import time

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
POSTERS = ROOT.parent / "shared" / "datasets" / "ml-100k-posters" / "images"
TYPES = ["LORA", "IA3", "MODA", "IISAN", "CROSSAN"]
SIDE = {"IISAN", "CROSSAN"}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--image_dir", default=str(POSTERS) if POSTERS.is_dir() else None)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--user_sample_ratio", type=float, default=1.0)
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    if args.image_dir is None:
        sys.exit("No posters found: pass --image_dir (the benchmark is about the multimodal pair).")

    from recbole.utils import init_seed

    from recbole_perpeft.config import Config
    from recbole_perpeft.data import create_dataset, data_preparation
    from recbole_perpeft.model.sequential_recommender.globalpeft import GlobalPEFT
    from recbole_perpeft.trainer import PEFTTrainer

    overrides = {
        "image_dir": args.image_dir, "user_sample_ratio": args.user_sample_ratio, "show_progress": False,
        "checkpoint_dir": os.path.join(args.out, "saved"),
    }  # fmt: skip
    rows, cold_cache_built = {}, False
    for peft_type in args.types.upper().split(","):
        config = Config(model="GlobalPEFT", dataset="ml-100k", config_dict={**overrides, "peft_type": peft_type})
        if peft_type in SIDE and not cold_cache_built:
            stale = glob.glob(os.path.join(config["cache_dir"], "ml-100k", "layers-*"))
            for path in stale:  # measure the hidden-state cache build from scratch once
                os.remove(path)
        init_seed(config["seed"], config["reproducibility"])
        train_data, valid_data, _ = data_preparation(config, create_dataset(config), GlobalPEFT)
        init_seed(config["seed"], config["reproducibility"])
        start = time()
        model = GlobalPEFT(config, train_data._dataset)
        build = time() - start
        trainer = PEFTTrainer(config, model)
        for epoch in range(args.epochs):
            loss = trainer._train_epoch(train_data, epoch)
            seconds = trainer.epoch_seconds[-1]
            print(f"{peft_type} epoch {epoch}: {seconds:.1f} s, summed batch loss {float(loss):.2f}", flush=True)
        start = time()
        valid = trainer.evaluate(valid_data, load_best_model=False, show_progress=False)
        rows[peft_type] = {
            "epoch_seconds": trainer.epoch_seconds,
            "mean_epoch_seconds": statistics.mean(trainer.epoch_seconds),
            "model_build_seconds": build,
            "hidden_state_cache": ("built" if not cold_cache_built else "reused") if peft_type in SIDE else None,
            "eval_seconds": time() - start,
            "valid_hit@30": float(valid["hit@30"]),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }
        cold_cache_built |= peft_type in SIDE
        del model, trainer

    lora = rows.get("LORA", {}).get("mean_epoch_seconds")
    print(f"\nml-100k, {args.epochs} epoch(s), user_sample_ratio {args.user_sample_ratio}, GlobalPEFT, "
          "MiniLM + EfficientNet-Lite0 (seconds on this machine):\n")
    print("| peft_type | s/epoch | ratio to LoRA | model build s (cache) | valid hit@30 | eval s | trainable |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        ratio = f"{r['mean_epoch_seconds'] / lora:.3f}" if lora else "-"
        cache = f" ({r['hidden_state_cache']})" if r["hidden_state_cache"] else ""
        print(f"| {name} | {r['mean_epoch_seconds']:.2f} | {ratio} | {r['model_build_seconds']:.1f}{cache} | "
              f"{100 * r['valid_hit@30']:.2f} | {r['eval_seconds']:.1f} | {r['trainable_parameters']:,} |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "adapter_speed.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
