"""recbole-perpeft reproduce --table=2|3|4|missing --dataset=D [--peft=LORA,IA3,IISAN] [--seeds=3]
[--rows=A,B] [--extend] [--result_dir=DIR] [--config_files=a.yaml,b.yaml] [--key=value ...]: see
reproduce/__init__.py."""

from __future__ import annotations

import argparse
import sys

from recbole_perpeft.reproduce.tables import DEFAULT_PEFT, TABLES


def parse_args(argv):
    from recbole_perpeft.cli_common import parse_overrides

    parser = argparse.ArgumentParser(prog="recbole-perpeft reproduce", allow_abbrev=False,
                                     description="Run one of the paper's tables over seeds.")  # fmt: skip
    parser.add_argument("--table", required=True, choices=TABLES)
    parser.add_argument("--dataset", "-d", required=True)
    parser.add_argument("--peft", default=None, help=f"PEFT types (Table 2: a block each; Tables 3, 4 and missing: "
                        f"the first; default {','.join(DEFAULT_PEFT)}, Table 4: IA3)")  # fmt: skip
    parser.add_argument("--seeds", default="3", help="a count (3: the config's seed and the two after) or a list")
    parser.add_argument("--rows", default=None, help="only these rows, as the table names them (e.g. "
                        "'w/o MM,FrozenMM,GlobalPEFT,PerPEFT'); their runs are reused by the whole table later")
    parser.add_argument("--extend", action="store_true", help="continue finished runs of a shorter schedule "
                        "(fewer epochs / stage2_epochs) to the one asked, by --resume, keeping the shorter runs")
    parser.add_argument("--jobs", default="1", help="runs at once, each a subprocess (docs/running.md)")
    parser.add_argument("--result_dir", default=None, help="default reproduce-<dataset>-table<N>/")
    parser.add_argument("--config_files", default=None, help="comma- or space-separated YAML files")
    args, rest = parser.parse_known_args(argv)
    overrides = parse_overrides(parser, rest)
    files = args.config_files.replace(",", " ").split() if args.config_files else None
    return args, files, overrides


def main(argv=None) -> None:
    from recbole_perpeft.compare import parse_seeds
    from recbole_perpeft.reproduce.runner import reproduce
    from recbole_perpeft.resume import TrainingInterrupted

    args, files, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        reproduce(args.table, args.dataset, peft=args.peft, seeds=parse_seeds(args.seeds),
                  result_dir=args.result_dir, config_file_list=files, overrides=overrides, only=args.rows,
                  extend=args.extend, jobs=args.jobs)  # fmt: skip
    except (TrainingInterrupted, KeyboardInterrupt):
        print("interrupted: run the same command again; finished runs are reused.", file=sys.stderr)
        sys.exit(130)
    except (ValueError, KeyError, FileNotFoundError, OSError) as err:
        sys.exit(f"error: {err}")
