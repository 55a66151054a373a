"""PerPEFT's stage-2 epoch against a GlobalPEFT epoch, per peft type, on a real dataset (issue 11: <= 1.05x).

    python bench/stage2_speed.py [--dataset=amazon-scientific] [--peft=IISAN,LORA] [--repeats=3]
        [--user_sample_ratio=1.0] [--n_groups=8] [--profile] [--key=value ...]

For each peft type, in one process: GlobalPEFT is built and trained one (warm-up) epoch; PerPEFT's stage 2
is built from it (its K-Means groups, group-homogeneous batches, group negatives) and trained one warm-up
epoch; then ``--repeats`` epochs of each, alternating (GlobalPEFT, PerPEFT, GlobalPEFT, ...), so that a
machine whose load drifts slows both alike. Prints every epoch's seconds, the medians, steps per epoch and
the ratio of the medians. Only training epochs are timed (no evaluation). ``--profile`` adds one cProfiled
epoch of each and prints the cumulative seconds of the steps' parts that stage 2 does differently (batch
collation, negative sampling, adapter switching, the optimizer), as shares of that epoch."""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from time import perf_counter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lora_speed import build  # noqa: E402 (after the path)


def timed_epoch(trainer, data, epoch: int) -> float:
    start = perf_counter()
    trainer._train_epoch(data, epoch)
    return perf_counter() - start


def measure(peft: str, args, overrides: dict) -> dict:
    from recbole_perpeft.trainer import PEFTTrainer
    from recbole_perpeft.two_stage import TwoStageTrainer, group_users

    keys = {"peft_type": peft, "show_progress": False, "n_groups": args.n_groups,
            "user_sample_ratio": args.user_sample_ratio, **overrides}  # fmt: skip
    config, train_data, global_model = build("GlobalPEFT", keys, args.dataset)
    global_trainer = PEFTTrainer(config, global_model)
    global_trainer._train_epoch(train_data, 0)  # warm-up: first-call costs are no epoch's
    per_config, per_data, perpeft = build("PerPEFT", keys, args.dataset)
    per_trainer = TwoStageTrainer(per_config, perpeft)
    per_trainer.prepare_stage2(global_model.state_dict(), group_users(global_model, per_data._dataset, per_config))
    stage2_data = per_trainer.stage2_loader(per_data._dataset)
    per_trainer._train_epoch(stage2_data, 0)  # warm-up
    seconds = {"global": [], "perpeft": []}
    for epoch in range(1, args.repeats + 1):
        seconds["global"].append(timed_epoch(global_trainer, train_data, epoch))
        seconds["perpeft"].append(timed_epoch(per_trainer, stage2_data, epoch))
        print(f"[{peft}] epoch {epoch}: GlobalPEFT {seconds['global'][-1]:.2f} s, PerPEFT stage 2 "
              f"{seconds['perpeft'][-1]:.2f} s", flush=True)  # fmt: skip
    if args.profile:
        for name, trainer, data in (("GlobalPEFT", global_trainer, train_data), ("PerPEFT", per_trainer, stage2_data)):
            print_profile(f"[{peft}] {name}", trainer._train_epoch, data, args.repeats + 1)
    return {"seconds": seconds, "steps": (len(train_data), len(stage2_data)), "users": train_data._dataset.user_num}


PROFILED = ("collate_fn", "sample", "activate", "step", "zero_grad")  # what stage 2 may do at another cost


def print_profile(title: str, epoch, *args) -> None:
    import cProfile
    import pstats

    profile = cProfile.Profile()
    profile.runcall(epoch, *args)
    stats = pstats.Stats(profile).stats  # {(file, line, function): (calls, ncalls, tottime, cumtime, callers)}
    total = max(cumulative for *_, cumulative, _ in stats.values())
    print(f"{title}: profiled epoch {total:.2f} s")
    for (file, line, function), (_, calls, _, cumulative, _) in sorted(stats.items(), key=lambda kv: -kv[1][3]):
        if (function in PROFILED and "recbole_perpeft" in file) or (function == "step" and "optim" in file):
            print(f"    {cumulative:8.3f} s {100 * cumulative / total:5.1f}%  {calls:>6} calls  "
                  f"{Path(file).name}:{line}({function})")


def main(argv=None) -> None:
    from recbole_perpeft.cli import parse_overrides

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="amazon-scientific")
    parser.add_argument("--peft", default="IISAN,LORA")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--user_sample_ratio", type=float, default=1.0)
    parser.add_argument("--n_groups", type=int, default=8)
    parser.add_argument("--profile", action="store_true", help="also one cProfiled epoch of each")
    args, rest = parser.parse_known_args(argv)
    overrides = parse_overrides(parser, rest)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch

    rows = {peft: measure(peft, args, overrides) for peft in [p.strip() for p in args.peft.split(",") if p.strip()]}
    print(f"\n{args.dataset}, user_sample_ratio {args.user_sample_ratio}, {args.n_groups} groups, "
          f"{torch.get_num_threads()} torch threads, {args.repeats} alternating epochs each (median s):")  # fmt: skip
    print(f"{'peft':<8}{'users':>7}{'steps G/P':>12}{'GlobalPEFT':>12}{'PerPEFT':>12}{'ratio':>8}")
    for peft, row in rows.items():
        g, p = (statistics.median(row["seconds"][k]) for k in ("global", "perpeft"))
        steps = f"{row['steps'][0]}/{row['steps'][1]}"
        print(f"{peft:<8}{row['users']:>7}{steps:>12}{g:>12.2f}{p:>12.2f}{p / g:>8.2f}")


if __name__ == "__main__":
    main()
