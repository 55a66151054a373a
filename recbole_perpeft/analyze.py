"""What each group's adapter looks at, as files and pictures (paper §4.4, §4.5, App. C.4, C.5).

Analyse a trained PerPEFT run (its stage-2 checkpoint, or the result JSON that names it):

    recbole-perpeft analyze --checkpoint=saved/PerPEFT-ml-100k-seed2024-....pth[,<other seeds>...]
        [--result=r.json[,...]] --out=DIR [--items=TOK,...] [--users=TOK,...] [--parts=profiles,attention,jsd,
        gradcam,case] [--top_k=10] [--n_items=4] [--gradcam_target=users|self] [--max_jsd_items=N]
        [--config_files=...] [--key=value ...]

The run's settings come from the checkpoint (model, dataset, seed), its groups file (n_groups) and, with
``--result``, the run's result JSON (every setting the run was given); ``--key=value`` overrides them, as
in a run (``--image_dir=DIR`` where the posters lie elsewhere, ``--peft_type=IA3`` without a result JSON).
Several checkpoints (the same setting with other seeds) add the intra-cluster JSD. See
recbole_perpeft/analysis/report.py for the files written.

Sweep the number of groups, and plot training curves or the cost of runs:

    recbole-perpeft analyze sweep --dataset=ml-100k --n_groups=2,4,8,16 [--model=PerPEFT] [--out=DIR]
        [--config_files=...] [--key=value ...]
    recbole-perpeft analyze curves --log=FILE [--result=r.json] [--metric=hit@30] --out=DIR
    recbole-perpeft analyze cost --results=globalpeft.json,perpeft.json --out=DIR"""

from __future__ import annotations

import argparse
import json
import os
import sys

from recbole_perpeft.cli_common import parse_overrides

COMMANDS = ("sweep", "curves", "cost")


def _split(value) -> list[str]:
    return [v.strip() for v in str(value).split(",") if v.strip()] if value else []


def _parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recbole-perpeft analyze" + (f" {command}" if command else ""),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    if command is None:
        parser.add_argument("--checkpoint", default=None, help="stage-2 checkpoint(s), comma-separated (seeds)")
        parser.add_argument("--result", default=None, help="the runs' result JSON(s), comma-separated, same order")
        parser.add_argument("--out", default="analysis", help="output folder")
        parser.add_argument("--items", default=None, help="item tokens to show (default: chosen, see summary.md)")
        parser.add_argument("--users", default=None, help="user tokens for the case study (default: chosen)")
        parser.add_argument("--parts", default=",".join(_parts()), help="which analyses, comma-separated")
        parser.add_argument("--top_k", type=int, default=10, help="case study: items per ranking")
        parser.add_argument("--n_items", type=int, default=4, help="items shown when --items is not given")
        parser.add_argument("--gradcam_target", default="users", choices=["users", "self"])
        parser.add_argument("--max_jsd_items", type=int, default=None, help="JSD over the first N titled items only")
        parser.add_argument("--config_files", default=None)
    elif command == "sweep":
        parser.add_argument("--dataset", "-d", required=True)
        parser.add_argument("--n_groups", required=True, help="comma-separated, e.g. 2,4,8,16")
        parser.add_argument("--model", "-m", default="PerPEFT")
        parser.add_argument("--out", default=None, help="output folder (default: sweep-<dataset>)")
        parser.add_argument("--config_files", default=None)
    elif command == "curves":
        parser.add_argument("--log", default=None, help="a run's log (RecBole's log/<model>/..., or a sweep's)")
        parser.add_argument("--result", default=None, help="a run's result JSON (seconds per epoch only)")
        parser.add_argument("--metric", default=None, help="validation metric to plot (default: the run's)")
        parser.add_argument("--out", default="curves")
    else:
        parser.add_argument("--results", required=True, help="result JSONs, comma-separated (e.g. GlobalPEFT, PerPEFT)")
        parser.add_argument("--out", default="cost")
    return parser


def _parts():
    from recbole_perpeft.analysis.report import PARTS

    return PARTS


def parse_args(argv: list[str]):
    command = argv[0] if argv and argv[0] in COMMANDS else None
    parser = _parser(command)
    args, rest = parser.parse_known_args(argv[1:] if command else argv)
    overrides = parse_overrides(parser, rest)
    if overrides and command in ("curves", "cost"):
        parser.error(f"'{command}' takes no config overrides, got {', '.join('--' + k for k in overrides)}")
    return command, args, overrides


def main(argv=None):
    command, args, overrides = parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        if command is None:
            from recbole_perpeft.analysis.report import analyze

            summary = analyze(
                _split(args.checkpoint),
                _split(args.result),
                args.out,
                _split(args.items),
                _split(args.users),
                overrides,
                _split(args.config_files) or None,
                _split(args.parts),
                args.top_k,
                args.n_items,
                args.gradcam_target,
                args.max_jsd_items,
            )
            print(open(os.path.join(args.out, "summary.md")).read())
            return summary
        if command == "sweep":
            from recbole_perpeft.analysis.sweep import sweep

            files = _split(args.config_files) or None
            return sweep(args.dataset, args.n_groups, args.model, args.out, files, overrides)
        if command == "curves":
            return curves_command(args)
        return cost_command(args)
    except (ValueError, KeyError, FileNotFoundError, OSError) as err:
        sys.exit(f"error: {err}")


def curves_command(args) -> str:
    from recbole_perpeft.analysis import plots
    from recbole_perpeft.analysis.curves import from_result, parse_log

    if not args.log and not args.result:
        raise ValueError("curves: give --log=<a run's log> (loss and validation per epoch) and/or --result=<r.json>.")
    result = json.load(open(args.result)) if args.result else {}
    curves = parse_log(open(args.log).read()) if args.log else {}
    if args.log and not curves:
        raise ValueError(f"{args.log} has no 'epoch N training' lines: give the log of a run (state INFO).")
    if not curves:
        curves = from_result(result)
        print("curves: a result JSON holds seconds per epoch only; loss and validation metrics need --log.")
    metric = args.metric or (result.get("config") or {}).get("valid_metric")
    os.makedirs(args.out, exist_ok=True)
    name = os.path.splitext(os.path.basename(args.log or args.result))[0]
    with open(os.path.join(args.out, f"{name}-curves.json"), "w") as f:
        json.dump(curves, f, indent=2)
    path = plots.training_curves(
        curves, os.path.join(args.out, f"{name}-curves.png"), name, str(metric).lower() if metric else None
    )
    print(f"written {path}")
    return path


def cost_command(args) -> str:
    from recbole_perpeft.analysis import plots
    from recbole_perpeft.analysis.curves import cost_rows

    results = []
    for path in _split(args.results):
        with open(path) as f:
            results.append(json.load(f))
    rows = cost_rows(results)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cost.json"), "w") as f:
        json.dump(rows, f, indent=2)
    lines = ["| run | trainable parameters | group-specific | s / epoch |", "|---|---:|---:|---|"]
    for row in rows:
        seconds = ", ".join(f"{k or 'epoch'}: {v:.1f}" for k, v in row["epoch_seconds"].items())
        name, parameters = row["label"].replace("\n", ", "), row["parameters"]
        lines.append(f"| {name} | {parameters['total']:,} | {parameters['group_specific']:,} | {seconds} |")
    with open(os.path.join(args.out, "cost.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    path = plots.cost_bars(rows, os.path.join(args.out, "cost.png"), "Trainable parameters and epoch time")
    print("\n".join(lines) + f"\nwritten {path}")
    return path


if __name__ == "__main__":
    from recbole_perpeft.cli_common import deprecated_alias

    deprecated_alias("python -m recbole_perpeft.analyze", "recbole-perpeft analyze")
    main()
