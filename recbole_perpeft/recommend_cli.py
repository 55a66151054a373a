"""The ``recommend`` and ``export`` subcommands (docs/recommend.md).

    recbole-perpeft recommend (--checkpoint=X.pth | --result=r.json | --export=DIR)
        (--users=FILE | --histories=FILE) [--k=10] [--exclude_seen=true] [--out=recommendations.jsonl]
        [--errors=OUT.errors.txt] [--batch_size=256] [--key=value ...]
    recbole-perpeft export (--checkpoint=X.pth | --result=r.json) --out=DIR [--key=value ...]

``--users``: one user token a line. ``--histories``: JSON lines, each a list of item tokens (oldest first)
or an object ``{"user": token, "history": [...]}`` (either key may be left out). Each good row gives one
JSON line in ``--out`` (its input ``line``, ``user``/``history`` as given, ``items``, ``scores``, and
``group`` for a grouped model); each bad row one line in ``--errors`` naming its line and what is wrong.
``--key=value`` overrides the run's config when the model is rebuilt (``--data_path=...``, ``--device=cpu``)."""

from __future__ import annotations

import argparse
import json
import sys

SUBCOMMANDS = ("recommend", "export")


def boolean(value: str) -> bool:
    lowered = str(value).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def parser_for(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"recbole-perpeft {command}", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a checkpoint (.pth) a run wrote")
    source.add_argument("--result", help="a run's result JSON (the checkpoint it names)")
    if command == "export":
        parser.add_argument("--out", required=True, help="the folder to write")
        return parser
    source.add_argument("--export", help="a folder `recbole-perpeft export` wrote (torch only)")
    rows = parser.add_mutually_exclusive_group(required=True)
    rows.add_argument("--users", help="a file of user tokens, one a line")
    rows.add_argument("--histories", help="a file of JSON lines: item token lists or {user, history} objects")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--exclude_seen", type=boolean, nargs="?", const=True, default=True)
    parser.add_argument("--out", default="recommendations.jsonl", help="JSON lines out")
    parser.add_argument("--errors", default=None, help="bad rows, one a line (default: OUT.errors.txt)")
    parser.add_argument("--batch_size", type=int, default=256)
    return parser


def read_rows(args) -> list[tuple[int, dict]]:
    """(line number, {user?, history?}) of every non-blank input line; a line that is not JSON keeps its
    error (``{"error": ...}``) for the errors file."""
    path = args.users or args.histories
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            if args.users:
                rows.append((number, {"user": line}))
                continue
            try:
                value = json.loads(line)
            except ValueError as err:
                rows.append((number, {"error": f"not a JSON line ({err})"}))
                continue
            if isinstance(value, dict):
                rows.append((number, {k: value[k] for k in ("user", "history") if k in value}))
            else:
                rows.append((number, {"history": value}))
    return rows


def recommend_main(args) -> None:
    from tqdm import tqdm

    if args.k < 1 or args.batch_size < 1:
        raise ValueError(f"--k and --batch_size must be positive, got {args.k} and {args.batch_size}.")
    if args.export:
        from recbole_perpeft.serving import TableRecommender

        recommender = TableRecommender.load(args.export)
    else:
        from recbole_perpeft.recommend import load

        recommender = load(args.checkpoint or args.result, args.overrides).recommender()
    recommender.batch_size = args.batch_size
    rows = read_rows(args)
    good, errors = [], []
    for number, row in rows:
        try:
            if "error" in row:
                raise ValueError(row["error"])
            good.append((number, row, recommender.resolve(row.get("user"), row.get("history"))))
        except ValueError as err:
            errors.append(f"line {number}: {err}")
    with tqdm(total=len(good), desc="Recommending", unit="row", file=sys.stderr) as bar:
        results = recommender.recommend_requests([r for _, _, r in good], args.k, args.exclude_seen, progress=bar)
    with open(args.out, "w") as f:
        for (number, row, _), result in zip(good, results, strict=True):
            line = {"line": number, **row, "items": result.items, "scores": result.scores}
            if result.group is not None:
                line["group"] = result.group
            f.write(json.dumps(line) + "\n")
    errors_file = args.errors or f"{args.out}.errors.txt"
    with open(errors_file, "w") as f:
        f.writelines(e + "\n" for e in errors)
    print(f"{len(good)} rows -> {args.out}; {len(errors)} refused -> {errors_file}", file=sys.stderr)


def recommend_command(argv: list[str]) -> None:
    main(["recommend", *argv])


def export_command(argv: list[str]) -> None:
    main(["export", *argv])


def main(argv: list[str]) -> None:
    from recbole_perpeft.cli_common import parse_overrides

    command, rest = argv[0], argv[1:]
    parser = parser_for(command)
    args, unknown = parser.parse_known_args(rest)
    args.overrides = parse_overrides(parser, unknown)
    if command == "recommend" and args.export and args.overrides:
        parser.error(f"--export serves a finished export: config overrides {sorted(args.overrides)} do not apply.")
    try:
        if command == "export":
            from recbole_perpeft.recommend import load

            out = load(args.checkpoint or args.result, args.overrides).export(args.out)
            print(f"exported to {out}", file=sys.stderr)
        else:
            recommend_main(args)
    except (ValueError, KeyError, FileNotFoundError, OSError) as err:
        sys.exit(f"error: {err}")
