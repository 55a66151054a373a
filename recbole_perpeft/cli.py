"""The command line: ``recbole-perpeft <command> [--key=value ...]`` (docs/cli.md).

:data:`COMMANDS` is the one dispatch table: a command's module is imported only when it runs, so
``recbole-perpeft --help`` and a reserved command stay fast. Without a command (``run_recbole_perpeft.py
--model=... --dataset=...``, or ``recbole-perpeft --model=...``) the arguments go to ``run``, as they always did.
Every command parses ``--key=value`` config overrides with ``cli_common.parse_overrides``, RecBole style."""

from __future__ import annotations

import argparse
import importlib
import sys

from recbole_perpeft.cli_common import flow_value, parse_overrides  # noqa: F401 (their old home)

# name -> ("module:function", one-line help); the function takes the arguments after the command.
COMMANDS = {
    "run": ("recbole_perpeft.cli:run_command",
            "train and evaluate a model (the default command); --model=A,B or --seeds compares"),
    "compare": ("recbole_perpeft.cli:compare_command", "train models over seeds: mean (std), paired t-tests"),
    "reproduce": ("recbole_perpeft.reproduce.cli:main", "run one of the paper's tables over seeds"),
    "tune": ("recbole_perpeft.cli:tune_command", "hyper-parameter search (reserved: arrives with issue 43)"),
    "analyze": ("recbole_perpeft.analyze:main",
                "what each group's adapter looks at; 'analyze sweep|curves|cost' for the rest"),
    "prepare": ("recbole_perpeft.data.prepare:main",
                "download and preprocess a dataset (or import a layout) into RecBole atomic files"),
    "recommend": ("recbole_perpeft.recommend_cli:recommend_command",
                  "top-k items for users or item histories, from a trained run"),
    "export": ("recbole_perpeft.recommend_cli:export_command",
               "a trained run as a folder that serves recommendations with torch only"),
    "report": ("recbole_perpeft.experiments.results_report:main", "results/ summaries rendered as docs/results/ pages"),
}  # fmt: skip

RUN_HELP = """Train and evaluate a model, RecBole style; or compare models over seeds.

    recbole-perpeft run --model=GlobalPEFT --dataset=ml-100k [--config_files=a.yaml,b.yaml]
        [--result_file=r.json] [--resume=saved/X.pth] [--key=value ...]

``run`` is the default command: ``recbole-perpeft --model=...`` and ``python run_recbole_perpeft.py --model=...``
are the same.

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
runs' files (recbole_perpeft/extend_runs.py). ``recbole-perpeft compare`` makes a comparison of any --model.

Several processes (RecBole's keys; gloo on a CPU, NCCL on GPUs; see recbole_perpeft/distributed.py). The
global batch stays ``train_batch_size``, each process trains on its share of every batch:

    python run_recbole_perpeft.py --model=PerPEFT --dataset=ml-100k --nproc=2 [--gpu_id=0,1] [--key=value ...]

Across machines, the same command on each: ``--world_size`` processes in all, ``--ip``/``--port`` of the
machine with ``--offset=0``, and each machine's ``--offset`` (the rank of its first process):

    machine A: ... --nproc=4 --world_size=8 --ip=10.0.0.1 --port=29500 --offset=0
    machine B: ... --nproc=4 --world_size=8 --ip=10.0.0.1 --port=29500 --offset=4"""


def parse_args(argv, prog: str = "recbole-perpeft run"):
    # allow_abbrev=False: `--seed=7` is a config override, not an abbreviation of --seeds.
    parser = argparse.ArgumentParser(
        prog=prog, description=RUN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
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
    parser.add_argument("--jobs", default="1", help="compare: runs at once, each a subprocess (docs/running.md)")
    args, rest = parser.parse_known_args(argv)
    overrides = parse_overrides(parser, rest)
    files = args.config_files.replace(",", " ").split() if args.config_files else None
    return args, files, overrides


def is_comparison(args) -> bool:
    if getattr(args, "compare", False):  # `recbole-perpeft compare`
        return True
    return "," in args.model or args.extend or str(args.jobs).strip() != "1" \
        or any(v is not None for v in (args.seeds, args.ttest, args.runs_from))


def main(argv=None):
    """``recbole-perpeft``: the command named first (see :data:`COMMANDS`), else ``run`` with every argument."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(top_help())
        return None
    if argv and not argv[0].startswith("-"):
        if argv[0] not in COMMANDS:
            print(f"error: unknown command '{argv[0]}'; the commands are {', '.join(COMMANDS)} "
                  "(recbole-perpeft --help), or none for run.", file=sys.stderr)  # fmt: skip
            sys.exit(2)
        status = command_function(argv[0])(argv[1:])
        # An exit status, or None: what some commands return for their callers (a path) is no status.
        return status if isinstance(status, int) else None
    return run_command(argv, argv_shown=argv)


def top_help() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join([
        "usage: recbole-perpeft [<command>] [--key=value ...]", "",
        "Personalised PEFT of multimodal foundation models for sequential recommendation, on RecBole.", "",
        "commands:", *lines, "",
        "Without a command the arguments go to run (recbole-perpeft --model=PerPEFT --dataset=ml-100k, as",
        "python run_recbole_perpeft.py does). 'recbole-perpeft <command> --help' shows a command's options;",
        "docs/cli.md has an example of each.",
    ])  # fmt: skip


def command_function(name: str):
    """The function behind ``name``, imported now; a module that cannot be imported ends the command in one line."""
    module_name, _, function = COMMANDS[name][0].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        print(f"error: recbole-perpeft {name} is not available here: cannot import {module_name} ({err}).",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)
    return getattr(module, function)


def tune_command(argv) -> None:
    """Reserved: the name is taken so that scripts written today keep meaning the same thing later."""
    print("recbole-perpeft tune: hyper-parameter search arrives with issue 43; it is not available yet.",
          file=sys.stderr)  # fmt: skip
    sys.exit(0 if argv[:1] in (["-h"], ["--help"]) else 2)


def compare_command(argv) -> None:
    """``recbole-perpeft compare``: the run command's flags, always a comparison (one model or several)."""
    run_command(argv, prog="recbole-perpeft compare", compare=True, argv_shown=["compare", *argv])


def run_command(argv, prog: str = "recbole-perpeft run", compare: bool = False, argv_shown=None):
    """``recbole-perpeft run`` (and no command): one run, or a comparison when ``--model``/``--seeds``
    ask for one. ``argv_shown``: the arguments the resume hint repeats."""
    args, files, overrides = parse_args(argv, prog)  # first: --help needs neither torch nor RecBole
    from recbole_perpeft.launch import WorkerDied
    from recbole_perpeft.resume import TrainingInterrupted

    args.compare = compare
    shown = ["run", *argv] if argv_shown is None else argv_shown
    try:
        if is_comparison(args):
            run_comparison(args, files, overrides)
        else:
            from recbole_perpeft.quick_start import run

            run(args.model, args.dataset, config_file_list=files, config_dict=overrides,
                result_file=args.result_file, resume=args.resume)  # fmt: skip
    except TrainingInterrupted as stop:
        print(interrupted_message(stop.checkpoint, args, shown), file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print(interrupted_message(None, args, shown), file=sys.stderr)
        sys.exit(130)
    except WorkerDied as died:
        how = interrupted_message(died.checkpoint, args, shown).removeprefix("interrupted: ")
        sys.exit(f"error: {died}: {how}")
    except (ValueError, KeyError, FileNotFoundError, OSError) as err:
        sys.exit(f"error: {err}")


def interrupted_message(checkpoint, args, argv) -> str:
    """One line on how to go on after Ctrl-C (exit status 130): resume a single run, rerun a comparison."""
    if is_comparison(args):
        return "interrupted: run the same command again; finished runs are reused."
    if checkpoint is None:
        return "interrupted before a checkpoint was written: run the same command again (finished caches are reused)."
    argv = [a for a in argv if not a.startswith("--resume")]
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
        jobs=args.jobs,
    )

if __name__ == "__main__":
    main()
