"""Train and evaluate a model, RecBole style.

    python run_recbole_perpeft.py --model=GlobalPEFT --dataset=ml-100k [--config_files=a.yaml,b.yaml]
        [--result_file=r.json] [--resume=saved/X.pth] [--key=value ...]

``--model`` is one of ours (GlobalPEFT, FrozenMM) or any model RecBole ships (SASRec, BERT4Rec, ...).
Every other ``--key=value`` overrides a YAML key (e.g. ``--epochs=1 --user_sample_ratio=0.2``)."""

from __future__ import annotations

import argparse
import sys


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "-m", default="GlobalPEFT")
    parser.add_argument("--dataset", "-d", default="ml-100k")
    parser.add_argument("--config_files", default=None, help="comma- or space-separated YAML files")
    parser.add_argument("--result_file", default=None, help="write the result JSON here")
    parser.add_argument("--resume", default=None, help="a checkpoint written by an earlier run")
    args, rest = parser.parse_known_args(argv)
    overrides = {}
    for arg in rest:
        key, sep, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if not key or not sep:
            parser.error(f"unrecognised argument '{arg}': config overrides are written --key=value")
        overrides[key] = value
    files = args.config_files.replace(",", " ").split() if args.config_files else None
    return args, files, overrides


def main(argv=None):
    args, files, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    from recbole_perpeft.quick_start import run

    try:
        run(args.model, args.dataset, config_file_list=files, config_dict=overrides,
            result_file=args.result_file, resume=args.resume)
    except (ValueError, KeyError, FileNotFoundError, OSError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
