"""PerPEFT's stage-2 epoch against its stage-1 (GlobalPEFT) epoch, per setting and peft type (issues 11, 46:
<= 1.05x), in one run.

    python bench/stage2_speed.py [--settings=small,large] [--peft=LORA,IISAN] [--repeats=3] [--profile]
        [--large_users=1.0] [--tiny] [--workdir=DIR] [--key=value ...]

Settings (``--key=value`` overrides apply to every one; ``--dataset=NAME [--user_sample_ratio=R] [--n_groups=K]``
runs that dataset as configured instead, setting ``custom``):
- ``small``: multimodal ml-100k (titles + posters, ``--image_dir``, default ../shared/datasets/ml-100k-posters/
  images), ``user_sample_ratio`` 0.3 (283 users: 8 groups of about 35, so a group's last partial batch is a
  large share of its steps), LoRA on every layer, default precision;
- ``large``: amazon-scientific (imported from ``--raw_dir``, default ../shared/datasets/amazon-scientific, on
  first use), ``--large_users`` of the users, LoRA on the top 2 text layers in bf16 (the README's LoRA subset).
IISAN runs its defaults in both. ``--tiny``: both settings on generated data with a 2-layer BERT (a smoke run
for the test; its timings mean nothing).

Per (setting, peft), in one process: GlobalPEFT is built and trained one warm-up epoch; PerPEFT's stage 2 is
built from it (its K-Means groups, group-homogeneous batches, group negatives) and trained one warm-up epoch;
then ``--repeats`` epochs of each, alternating, so that a machine whose load drifts slows both alike. Only
training epochs are timed (no evaluation). Each epoch's wall seconds and process CPU seconds are printed: on a
machine shared with other jobs the CPU seconds move less with the load than the wall seconds. The table gives
the medians, the ratio of the medians and the spread (lowest and highest ratio of an epoch pair), steps per epoch
and the distinct items the steps encode (load-free counts of the work). ``--profile`` adds one cProfiled epoch
of each and prints the cumulative seconds of the parts that stage 2 does differently."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from time import perf_counter, process_time

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from lora_speed import build  # noqa: E402 (after the path)

# The shared data beside the checkout (or beside the folder of worktrees that holds it).
SHARED = next((p / "shared" / "datasets" for p in ROOT.parents[:2] if (p / "shared" / "datasets").is_dir()),
              ROOT.parent / "shared" / "datasets")  # fmt: skip
SETTINGS = ("small", "large")


def setting_keys(setting: str, peft: str, args) -> tuple[str, dict]:
    """(dataset, config keys) of one setting for one peft type."""
    lora = peft.upper() == "LORA"
    if setting == "custom":
        return args.dataset, {"user_sample_ratio": args.user_sample_ratio, "n_groups": args.n_groups}
    if args.tiny:
        users = 24 if setting == "small" else 64
        return args.tiny_dataset, {"user_sample_ratio": users / args.tiny_users, "n_groups": 2 if setting == "small"
                                   else 4, **({"adapt_layers": 1} if lora and setting == "large" else {})}
    if setting == "small":
        if not args.image_dir or not Path(args.image_dir).is_dir():
            sys.exit(f"--image_dir={args.image_dir}: no poster folder (the small setting is multimodal ml-100k).")
        return "ml-100k", {"image_dir": args.image_dir, "user_sample_ratio": 0.3, "n_groups": 8}
    keys = {"user_sample_ratio": args.large_users, "n_groups": 8, "raw_dir": args.raw_dir}
    return "amazon-scientific", {**keys, **({"adapt_layers": 2, "precision": "bf16"} if lora else {})}


def timed_epoch(trainer, data, epoch: int) -> tuple[float, float]:
    """(wall, process CPU) seconds of one training epoch."""
    wall, cpu = perf_counter(), process_time()
    trainer._train_epoch(data, epoch)
    return perf_counter() - wall, process_time() - cpu


def epoch_work(loader) -> tuple[int, int, int]:
    """(steps, partial batches, distinct items encoded summed over the steps) of one pass over ``loader``
    (its collation only: the batches, not the training)."""
    import torch

    steps = partial = items = 0
    for batch in loader:
        names = ("item_id_list", "target_item_list", "neg_item_list", "shared_neg_items")
        fields = [batch[k].reshape(-1) for k in names if k in batch.interaction]
        steps += 1
        partial += len(batch) < loader.step
        items += int(torch.unique(torch.cat(fields)).numel())
    return steps, partial, items


def measure(setting: str, peft: str, args, overrides: dict) -> dict:
    from recbole_perpeft.trainer import PEFTTrainer
    from recbole_perpeft.two_stage import TwoStageTrainer, group_users

    dataset, keys = setting_keys(setting, peft, args)
    keys = {**args.base, **keys, "peft_type": peft, "show_progress": False, **overrides}
    config, train_data, global_model = build("GlobalPEFT", keys, dataset)
    global_trainer = PEFTTrainer(config, global_model)
    global_trainer._train_epoch(train_data, 0)  # warm-up: first-call costs are no epoch's
    per_config, per_data, perpeft = build("PerPEFT", keys, dataset)
    per_trainer = TwoStageTrainer(per_config, perpeft)
    per_trainer.prepare_stage2(global_model.state_dict(), group_users(global_model, per_data._dataset, per_config))
    stage2_data = per_trainer.stage2_loader(per_data._dataset)
    per_trainer._train_epoch(stage2_data, 0)  # warm-up
    work = {"global": epoch_work(train_data), "perpeft": epoch_work(stage2_data)}
    seconds = {"global": [], "perpeft": []}
    for epoch in range(1, args.repeats + 1):
        seconds["global"].append(timed_epoch(global_trainer, train_data, epoch))
        seconds["perpeft"].append(timed_epoch(per_trainer, stage2_data, epoch))
        (gw, gc), (pw, pc) = seconds["global"][-1], seconds["perpeft"][-1]
        print(f"[{setting} {peft}] epoch {epoch}: stage 1 (GlobalPEFT) {gw:.2f} s wall / {gc:.2f} s CPU, "
              f"stage 2 (PerPEFT) {pw:.2f} s / {pc:.2f} s", flush=True)  # fmt: skip
    if args.profile:
        for name, trainer, data in (("GlobalPEFT", global_trainer, train_data), ("PerPEFT", per_trainer, stage2_data)):
            print_profile(f"[{setting} {peft}] {name}", trainer._train_epoch, data, args.repeats + 1)
    precision = getattr(global_model.item_tower.precision, "name", "?")
    return {"seconds": seconds, "work": work, "users": train_data._dataset.user_num - 1, "dataset": dataset,
            "group_sizes": per_trainer.groups.sizes(), "precision": precision}  # fmt: skip


PROFILED = ("collate_fn", "sample", "activate", "set_adapter", "step", "zero_grad", "backward")


def print_profile(title: str, epoch, *args) -> None:
    import cProfile
    import pstats

    profile = cProfile.Profile()
    profile.runcall(epoch, *args)
    stats = pstats.Stats(profile).stats  # {(file, line, function): (calls, ncalls, tottime, cumtime, callers)}
    total = max(cumulative for *_, cumulative, _ in stats.values())
    print(f"{title}: profiled epoch {total:.2f} s")
    for (file, line, function), (_, calls, _, cumulative, _) in sorted(stats.items(), key=lambda kv: -kv[1][3]):
        ours = "recbole_perpeft" in file or ("peft" in file and function == "set_adapter")
        if (function in PROFILED and ours) or (function in ("step", "backward") and ("optim" in file or
                                                                                    "_tensor" in file)):
            print(f"    {cumulative:8.3f} s {100 * cumulative / total:5.1f}%  {calls:>6} calls  "
                  f"{Path(file).name}:{line}({function})")


def ratios(row: dict, index: int) -> tuple[float, float, float, float, float]:
    """(stage-1 median, stage-2 median, ratio of the medians, lowest and highest ratio of an epoch pair);
    ``index`` 0: wall seconds, 1: CPU seconds."""
    g = [s[index] for s in row["seconds"]["global"]]
    p = [s[index] for s in row["seconds"]["perpeft"]]
    pairs = [b / a for a, b in zip(g, p, strict=True)]
    g, p = statistics.median(g), statistics.median(p)
    return g, p, p / g, min(pairs), max(pairs)


def print_table(rows: dict, args) -> None:
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nPerPEFT stage 2 / stage 1 per training epoch; {torch.get_num_threads()} torch threads, {args.repeats} "
          f"alternating epochs each, load average {load:.1f} on {os.cpu_count()} CPUs at the end:")  # fmt: skip
    head = f"{'setting':<8}{'peft':<7}{'users':>6}{'steps 1/2':>11}{'partial 1/2':>13}{'items 1/2':>14}"
    print(f"{head}{'wall s 1/2':>14}{'ratio':>7}{'spread':>12}{'CPU s 1/2':>14}{'ratio':>7}{'spread':>12}")
    for (setting, peft), row in rows.items():
        (gs, gp, gi), (ps, pp, pi) = row["work"]["global"], row["work"]["perpeft"]
        line = f"{setting:<8}{peft:<7}{row['users']:>6}{f'{gs}/{ps}':>11}{f'{gp}/{pp}':>13}{f'{gi}/{pi}':>14}"
        for index in (0, 1):
            g, p, ratio, low, high = ratios(row, index)
            line += f"{f'{g:.2f}/{p:.2f}':>14}{ratio:>7.2f}{f'{low:.2f}-{high:.2f}':>12}"
        print(line)
    for (setting, peft), row in rows.items():
        print(f"  {setting} {peft}: {row['dataset']}, {row['precision']}, group sizes {row['group_sizes']}")


def main(argv=None) -> int:
    from recbole_perpeft.cli import parse_overrides

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--peft", default="LORA,IISAN")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--large_users", type=float, default=1.0, help="user_sample_ratio of the large setting")
    parser.add_argument("--image_dir", default=str(SHARED / "ml-100k-posters" / "images"))
    parser.add_argument("--raw_dir", default=str(SHARED / "amazon-scientific"))
    parser.add_argument("--dataset", help="instead of the settings: this dataset, as configured (setting 'custom')")
    parser.add_argument("--user_sample_ratio", type=float, default=1.0, help="with --dataset")
    parser.add_argument("--n_groups", type=int, default=8, help="with --dataset")
    parser.add_argument("--profile", action="store_true", help="also one cProfiled epoch of each")
    parser.add_argument("--tiny", action="store_true", help="generated data, a 2-layer BERT (a smoke run)")
    parser.add_argument("--workdir", help="--tiny: where the generated data and caches go (default: a temporary one)")
    args, rest = parser.parse_known_args(argv)
    overrides = parse_overrides(parser, rest)
    args.settings = ["custom"] if args.dataset else [s.strip() for s in args.settings.split(",") if s.strip()]
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if not args.dataset and (set(args.settings) - set(SETTINGS) or not args.settings):
        parser.error(f"--settings takes {','.join(SETTINGS)}")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    args.base = {}
    if args.tiny:
        tiny_setup(args)
    pefts = [p.strip().upper() for p in args.peft.split(",") if p.strip()]
    rows = {(s, p): measure(s, p, args, overrides) for s in args.settings for p in pefts}
    print_table(rows, args)
    return 0


def tiny_setup(args) -> None:
    """Generated users over generated titles and a 2-layer BERT in a work folder (the bench's own, or temporary)."""
    from types import SimpleNamespace

    import numpy as np
    import torch
    from lora_speed_data import DATASET, tiny_bert, write_dataset

    torch.set_num_threads(1)  # tiny matrices gain nothing from threads
    work = Path(args.workdir or tempfile.mkdtemp(prefix="stage2-speed-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # RecBole's trainer writes log_tensorboard/ under the working directory
    args.tiny_users = 64
    write_dataset(work / "data", SimpleNamespace(users=args.tiny_users, items=60, seq_len=8), np.random.default_rng(0))
    args.tiny_dataset = DATASET
    args.repeats = min(args.repeats, 2)
    args.base = {
        "data_path": str(work / "data"), "load_col": {"inter": ["user_id", "item_id", "timestamp"],
        "item": ["item_id", "title"]}, "text_field": "title", "modalities": ["text"],
        "text_encoder_path": tiny_bert(work / "tiny-bert"), "user_inter_num_interval": "[0,inf)",
        "item_inter_num_interval": "[0,inf)", "checkpoint_dir": str(work / "saved"), "cache_dir": str(work / "cache"),
        "worker": 0, "hidden_size": 16, "inner_size": 32, "n_heads": 2, "projector_hidden_size": 32,
        "train_batch_size": 8, "topk": [10], "valid_metric": "hit@10",
    }  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
