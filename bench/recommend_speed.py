"""Recommendations per second from a trained run: (a) the full model (``recbole_perpeft.load(...).recommender()``)
and (b) its export (``serving.TableRecommender``), for known users (by user token, scored from their stored
history, in their own group) and new users (by item history; PerPEFT assigns their group), in one run.

    python bench/recommend_speed.py [--checkpoint=X.pth | --model=FrozenMM --epochs=1] [--requests=10000]
        [--k=10] [--batch_size=256] [--peft_type=...] [--out=bench/results/recommend_speed]
    python bench/recommend_speed.py --tiny      # smoke mode: a generated dataset, a tiny CLIP, 200 requests

Without ``--checkpoint`` the model is first trained on amazon-scientific (imported on first use from
/work/shared/datasets/amazon-scientific, or ``--raw_dir``). Known users are the dataset's users, cycled to
``--requests`` rows; new users are the raw file's users that 5-core filtering dropped, their histories kept to
the dataset's items (cycled likewise). Every figure is the best of ``--repeats`` passes over all requests, after
one warm-up batch; loading, the full model's first call (its item tables: the foundation model's work) and
exporting are timed apart, and one ratio counts them in (a batch job from cold). Prints one table and the
ratios, and writes ``OUT/recommend_speed.json``."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path
from time import perf_counter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SCIENTIFIC = ROOT.parent / "shared" / "datasets" / "amazon-scientific"


def train(args, out: Path) -> str:
    """A checkpoint of ``args.model`` trained ``args.epochs`` epochs (amazon-scientific, or the tiny data)."""
    from recbole_perpeft.quick_start import run

    config = {"epochs": args.epochs, "show_progress": False, "checkpoint_dir": str(out / "saved"),
              "cache_dir": str(out / "cache"), "state": "WARNING", "stage1_epochs": args.epochs,
              "stage2_epochs": args.epochs}  # fmt: skip
    if args.peft_type:
        config["peft_type"] = args.peft_type
    if args.tiny:
        from tests.tiny import make_atomic_dataset, make_tiny_clip, quick_config

        clip = make_tiny_clip(out / "clip")
        keys = make_atomic_dataset(out / "data", "speedtoy", n_users=40, n_items=40)
        config = {**quick_config(out, **keys, foundation_model="clip", clip_path=clip.path, topk=[5],
                                 valid_metric="hit@5", n_groups=2), **config}  # fmt: skip
        return run(args.model, "speedtoy", config_dict=config)["checkpoint"]
    config.update(data_path=str(out / "data"), raw_dir=args.raw_dir)
    return run(args.model, "amazon-scientific", config_dict=config)["checkpoint"]


def new_user_histories(args, rec) -> list[list[str]]:
    """Histories of users the run never saw, in the dataset's items (tiny: prefixes of known histories)."""
    if args.tiny:
        return [[rec.item_tokens[i] for i in rec.histories[u, : max(1, int(n) // 2)].tolist()]
                for u, n in enumerate(rec.lengths.tolist()) if u > 0]  # fmt: skip
    histories = []
    with open(Path(args.raw_dir) / "users.tsv") as f:
        for line in f:
            user, _, items = line.rstrip("\n").partition("\t")
            kept = [t for t in items.split() if t in rec.item_index]
            if user not in rec.user_index and kept:
                histories.append(kept)
    return histories


def timed(recommender, requests, args) -> tuple[float, float]:
    """(seconds of the warm-up batch, best seconds of a pass over ``requests``)."""
    start = perf_counter()
    recommender.recommend_requests(requests[: args.batch_size], args.k)
    first = perf_counter() - start
    best = float("inf")
    for _ in range(args.repeats):
        start = perf_counter()
        recommender.recommend_requests(requests, args.k)
        best = min(best, perf_counter() - start)
    return first, best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="a trained run's checkpoint (else one is trained)")
    parser.add_argument("--model", default="FrozenMM")
    parser.add_argument("--peft_type", default=None)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--raw_dir", default=str(SCIENTIFIC))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "recommend_speed"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--tiny", action="store_true", help="smoke mode: generated data, tiny CLIP, 200 requests")
    args = parser.parse_args()
    if args.tiny:
        args.requests, args.repeats, args.batch_size = min(args.requests, 200), 1, 64
    elif not args.checkpoint and not (Path(args.raw_dir) / "users.tsv").is_file():
        sys.exit(f"SKIPPED: amazon-scientific not found at {args.raw_dir} (give --raw_dir or --checkpoint).")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)  # RecBole's log_tensorboard/

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import recbole_perpeft
    from recbole_perpeft.serving import Request, TableRecommender

    checkpoint = args.checkpoint or train(args, out)
    start = perf_counter()
    run = recbole_perpeft.load(checkpoint)
    full = run.recommender(batch_size=args.batch_size)
    load_seconds = perf_counter() - start
    start = perf_counter()  # the first call computes the item tables (the foundation model's work)
    full.recommend_requests([Request(1, [])], args.k)
    first_call_seconds = perf_counter() - start
    start = perf_counter()
    run.export(str(out / "export"), full)
    export_seconds = perf_counter() - start
    start = perf_counter()
    table = TableRecommender.load(str(out / "export"))
    table.batch_size = args.batch_size
    table_load_seconds = perf_counter() - start

    known = [Request(u, []) for u in itertools.islice(itertools.cycle(range(1, len(full.user_tokens))), args.requests)]
    histories = new_user_histories(args, full)
    new = [full.resolve(history=h) for h in itertools.islice(itertools.cycle(histories), args.requests)]
    rows = {}
    for name, recommender in (("full", full), ("export", table)):
        for kind, requests in (("known", known), ("new", new)):
            first, best = timed(recommender, requests, args)
            rows[f"{name}/{kind}"] = {"per_second": len(requests) / best, "seconds": best, "first_batch_s": first}
    report = {
        "model": run.model_name, "dataset": run.dataset_name, "checkpoint": checkpoint, "requests": args.requests,
        "k": args.k, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
        "device": str(run.config["device"]), "known_users": len(full.user_tokens) - 1,
        "distinct_new_histories": len(histories), "load_s": load_seconds, "first_call_s": first_call_seconds,
        "export_s": export_seconds,
        "export_load_s": table_load_seconds, "rows": rows,
        "ratios": {
            "export/full, known": rows["export/known"]["per_second"] / rows["full/known"]["per_second"],
            "export/full, new": rows["export/new"]["per_second"] / rows["full/new"]["per_second"],
            "known/new, full": rows["full/known"]["per_second"] / rows["full/new"]["per_second"],
            "known/new, export": rows["export/known"]["per_second"] / rows["export/new"]["per_second"],
            # A batch job from cold: loading (and the full model's first call, its item tables) included.
            "export/full, known, from cold": (load_seconds + first_call_seconds + rows["full/known"]["seconds"])
            / (table_load_seconds + rows["export/known"]["seconds"]),
        },
    }  # fmt: skip
    print(f"{run.model_name} on {run.dataset_name}, {args.requests} requests, k={args.k}, batch {args.batch_size}, "
          f"{report['device']}, {report['threads']} threads")  # fmt: skip
    print(f"full model: load {load_seconds:.1f}s, first call {first_call_seconds:.1f}s; export {export_seconds:.1f}s, "
          f"export load {table_load_seconds:.2f}s")
    print(f"{'':16}{'recs/s':>10}{'pass s':>9}{'first batch s':>15}")
    for key, row in rows.items():
        print(f"{key:16}{row['per_second']:10.0f}{row['seconds']:9.2f}{row['first_batch_s']:15.2f}")
    for key, ratio in report["ratios"].items():
        print(f"ratio {key}: {ratio:.2f}x")
    with open(out / "recommend_speed.json", "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
