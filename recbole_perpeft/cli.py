"""Train and evaluate a model, RecBole style; or compare models over seeds.

    python run_recbole_perpeft.py --model=GlobalPEFT --dataset=ml-100k [--config_files=a.yaml,b.yaml]
        [--result_file=r.json] [--resume=saved/X.pth] [--key=value ...]

Recommendations from a trained run: ``recommend`` and ``export`` subcommands (docs/recommend.md).

``--model`` is one of ours (GlobalPEFT, FrozenMM, PerPEFT) or any model RecBole ships (SASRec, BERT4Rec, ...).
Every other ``--key=value`` overrides a YAML key (e.g. ``--epochs=1 --user_sample_ratio=0.2``).

Comparison (paper Table 2 style; see recbole_perpeft/compare.py):

    python run_recbole_perpeft.py --model=SASRec,FrozenMM,GlobalPEFT,PerPEFT --dataset=ml-100k --seeds=3
        [--result_file=table.json] [--ttest=PerPEFT] [--config_files=...] [--key=value ...]

A comma in ``--model``, or ``--seeds`` or ``--ttest``, makes a comparison: every model is trained with every
seed (``--seeds=N``: the config's seed and the N-1 after it; ``--seeds=1,5,9``: those; default 1), each run's
result JSON goes to ``table.runs/<model>-seed<s>.json`` (and is reused when the command is run again), and
``table.json`` / ``table.md`` get mean (std) per model and metric and paired t-tests against ``--ttest``
(default: the last model). Two-stage models of one seed share one stage-1 GlobalPEFT. ``--runs_from=NAME=PATH,...``
takes rows from finished runs elsewhere (a folder of ``NAME-seed<s>.json``, or ``folder/label``) instead of
training them; NAME may be any label listed in ``--model``. ``--extend`` continues finished runs that trained fewer
epochs than asked now (``epochs``; ``stage2_epochs`` of a two-stage model) by ``--resume``, keeping the shorter
runs' files (recbole_perpeft/extend_runs.py).

Several processes (RecBole's keys; gloo on a CPU, NCCL on GPUs; see recbole_perpeft/distributed.py). The
global batch stays ``train_batch_size``, each process trains on its share of every batch:

    python run_recbole_perpeft.py --model=PerPEFT --dataset=ml-100k --nproc=2 [--gpu_id=0,1] [--key=value ...]

Across machines, the same command on each: ``--world_size`` processes in all, ``--ip``/``--port`` of the
machine with ``--offset=0``, and each machine's ``--offset`` (the rank of its first process):

    machine A: ... --nproc=4 --world_size=8 --ip=10.0.0.1 --port=29500 --offset=0
    machine B: ... --nproc=4 --world_size=8 --ip=10.0.0.1 --port=29500 --offset=4"""

from __future__ import annotations

import argparse
import sys

import yaml


def parse_args(argv):
    # allow_abbrev=False: `--seed=7` is a config override, not an abbreviation of --seeds.
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--model", "-m", default="GlobalPEFT", help="a model, or comma-separated models to compare")
    parser.add_argument("--dataset", "-d", default="ml-100k")
    parser.add_argument("--config_files", default=None, help="comma- or space-separated YAML files")
    parser.add_argument("--result_file", default=None, help="write the result JSON here")
    parser.add_argument("--resume", default=None, help="a checkpoint written by an earlier run")
    parser.add_argument("--seeds", default=None, help="compare over seeds: a count (3) or a list (1,2,3)")
    parser.add_argument("--ttest", default=None, help="compare: the reference model of the paired t-tests")
    parser.add_argument("--runs_from", default=None,
                        help="compare: NAME=PATH,... rows read from finished runs (a folder, or folder/label)")
    parser.add_argument("--extend", action="store_true",
                        help="compare: continue finished runs of a shorter schedule to the epochs asked (--resume)")
    args, rest = parser.parse_known_args(argv)
    overrides = parse_overrides(parser, rest)
    files = args.config_files.replace(",", " ").split() if args.config_files else None
    return args, files, overrides


def parse_overrides(parser, rest: list[str]) -> dict:
    """The ``--key=value`` config overrides left over by ``parser`` (every command line of the package)."""
    overrides = {}
    for arg in rest:
        key, sep, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if not key or not sep:
            parser.error(f"unrecognised argument '{arg}': config overrides are written --key=value")
        overrides[key] = flow_value(value)
    return overrides


def flow_value(value: str):
    """``{lora_dropout: 0.5}`` or ``[5, 10]`` (YAML flow syntax, as in a YAML file) -> dict / list;
    anything else stays a string for RecBole's own conversion (numbers, booleans, Python literals)."""
    if value[:1] in "{[":
        try:
            loaded = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        if isinstance(loaded, (dict, list)):
            return loaded
    return value


def is_comparison(args) -> bool:
    return "," in args.model or args.extend or any(v is not None for v in (args.seeds, args.ttest, args.runs_from))


def main(argv=None):
    from recbole_perpeft.launch import WorkerDied
    from recbole_perpeft.resume import TrainingInterrupted

    if (sys.argv[1:] if argv is None else argv)[:1] in (["recommend"], ["export"]):  # recommend_cli.py
        from recbole_perpeft.recommend_cli import main as subcommand

        return subcommand(sys.argv[1:] if argv is None else argv)
    args, files, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if is_comparison(args):
            run_comparison(args, files, overrides)
        else:
            from recbole_perpeft.quick_start import run

            run(args.model, args.dataset, config_file_list=files, config_dict=overrides,
                result_file=args.result_file, resume=args.resume)  # fmt: skip
    except TrainingInterrupted as stop:
        print(interrupted_message(stop.checkpoint, args, argv), file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print(interrupted_message(None, args, argv), file=sys.stderr)
        sys.exit(130)
    except WorkerDied as died:
        how = interrupted_message(died.checkpoint, args, argv).removeprefix("interrupted: ")
        sys.exit(f"error: {died}: {how}")
    except (ValueError, KeyError, FileNotFoundError, OSError) as err:
        sys.exit(f"error: {err}")


def interrupted_message(checkpoint, args, argv) -> str:
    """One line on how to go on after Ctrl-C (exit status 130): resume a single run, rerun a comparison."""
    if is_comparison(args):
        return "interrupted: run the same command again; finished runs are reused."
    if checkpoint is None:
        return "interrupted before a checkpoint was written: run the same command again (finished caches are reused)."
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--resume")]
    return f"interrupted: resume with  recbole-perpeft {' '.join(argv)} --resume={checkpoint}"


def run_comparison(args, files, overrides):
    from recbole_perpeft.compare import DEFAULT_SEEDS, compare, parse_seeds

    if args.resume:
        raise ValueError(
            "--resume continues a single run; a comparison continues by itself when run again "
            "(it reuses the per-run result JSONs it finds)."
        )
    compare(
        args.model,
        args.dataset,
        seeds=parse_seeds(args.seeds) if args.seeds is not None else DEFAULT_SEEDS,
        config_file_list=files,
        overrides=overrides,
        result_file=args.result_file,
        reference=args.ttest,
        runs_from=args.runs_from,
        extend=args.extend,
    )

if __name__ == "__main__":
    main()
