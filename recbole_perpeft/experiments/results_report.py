"""Render the committed experiment summaries (``results/<slug>/summary.json`` + ``notes.md``) as Markdown pages.

    python -m recbole_perpeft.experiments.results_report results/ [--out=docs/results] [--check]

- One page per experiment, ``<out>/<slug>.md``: title, where the numbers come from (``"source": "transcribed"``
  summaries say so), the protocol line, the commands, every table as the paper prints it (``mean (std)``, the
  best number of each metric column in bold, a p-value table, a per-seed table where the summary has one),
  then the notes. Where the protocol names a paper table (``"paper_table"``, optional, with ``"paper_peft"``,
  the PEFT type as ``--peft`` names it), the paper's numbers from recbole_perpeft/reproduce/paper_tables.yaml
  stand in a ``<metric> (paper)`` column beside ours, rows matched by label.
- ``<out>/README.md``: one line per experiment (title, status, link); ``<out>/history.md``: the superseded and
  withdrawn ones, one line each with the reason.
- A ``{"mean", "std"}`` cell may carry an optional ``"mark"`` (e.g. ``"†"``, a significance mark as printed),
  appended to the cell; the table's ``note`` says what it means.
- Numbers: in a table with ``"scale": "x100"`` the metric columns (a ``@`` in the name) print with 2 decimals,
  as the paper prints them; every other number prints as stored (Python's shortest form), strings verbatim.
- Under each table with numeric columns, a link to its bar chart ``<out>/<slug>-<n>.png`` (n counts the
  page's tables from 1; drawn by :mod:`recbole_perpeft.experiments.results_charts`).
- The output is deterministic (slugs sorted, no dates), so ``--check`` can compare it byte for byte with the
  committed pages: it exits 1 listing every page that differs, is missing, or has no summary any more. A chart
  is compared by its presence and pixel size, since its bytes depend on the matplotlib / FreeType version.

:func:`summary_from_comparison` turns the JSON that ``recbole_perpeft.compare`` or ``recbole_perpeft.reproduce``
writes into this summary format (``"source": "runs"``), so a new experiment is committed as data.

Hand-written: the summary format is this project's own (no library renders it); the statistics themselves come
from recbole_perpeft.compare_report (scipy)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from recbole_perpeft.experiments.results_charts import bar_chart, numeric_columns, png_size
from recbole_perpeft.reproduce.paper import load_paper, paper_note, paper_rows

STATUSES = ("current", "superseded", "withdrawn")
REQUIRED = ("experiment", "title", "source", "status", "protocol", "commands", "tables")


def load_summary(path) -> dict:
    """One summary.json, checked for the fields the pages need; a bad one is a one-line error naming it."""
    path = Path(path)
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable JSON file ({error}); fix or remove it.") from None
    missing = [key for key in REQUIRED if not isinstance(summary, dict) or key not in summary]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)} (results_schema: every summary has {REQUIRED}).")
    if summary["status"] not in STATUSES:
        raise ValueError(f"{path}: status {summary['status']!r} is not one of {STATUSES}.")
    if summary["status"] != "current" and not summary.get("reason"):
        raise ValueError(f"{path}: a {summary['status']} experiment needs a one-line 'reason' for the history page.")
    if summary["experiment"] != path.parent.name:
        raise ValueError(f"{path}: experiment {summary['experiment']!r} differs from its folder {path.parent.name!r}.")
    for i, table in enumerate(summary["tables"]):
        if not isinstance(table, dict) or not {"columns", "rows"} <= set(table):
            raise ValueError(f"{path}: tables[{i}] needs 'columns' and 'rows'.")
        if any(not isinstance(row, dict) or "label" not in row for row in table["rows"]):
            raise ValueError(f"{path}: every row of tables[{i}] needs a 'label' (and 'values').")
    return summary


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _mean(value):
    """The number a cell is ranked by (None for strings and empty cells)."""
    if isinstance(value, dict):
        value = value.get("mean")
    return value if _is_number(value) else None


def _number(value, fixed: bool) -> str:
    if not _is_number(value):
        return "" if value is None else str(value)
    return f"{value:.2f}" if fixed else repr(value)


def format_cell(value, fixed: bool, bold: bool = False) -> str:
    """A cell as printed: a number, ``mean (std)``, or a string verbatim; ``bold`` marks the column's best."""
    if isinstance(value, dict):
        std = value.get("std")
        text = _number(value.get("mean"), fixed)
        text = f"**{text}**" if bold else text
        text = text if std is None else f"{text} ({_number(std, fixed)})"
        return text + value.get("mark", "")
    text = _number(value, fixed)
    return f"**{text}**" if bold and text else text


def _fixed(table: dict, column: str) -> bool:
    return table.get("scale") == "x100" and "@" in column


def best_values(table: dict) -> dict:
    """{metric column: the best mean as printed}; ties are all bold, since they print the same."""
    best = {}
    for column in table["columns"]:
        if "@" not in column:
            continue
        means = [m for row in table["rows"] if (m := _mean(row.get("values", {}).get(column))) is not None]
        if means:
            best[column] = _number(max(means), _fixed(table, column))
    return best


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def _header(first: str, columns) -> list[str]:
    return [_row([first, *columns]), "|---|" + "---:|" * len(columns)]


def render_table(table: dict, paper: dict | None = None) -> list[str]:
    """One table's Markdown lines: the values, then p-values and per-seed values where the summary has them.

    ``paper``: {row label: {metric: number as the paper prints it}}; a metric with any gets a ``(paper)`` column."""
    columns, paper = table["columns"], paper or {}
    labels = [row["label"] for row in table["rows"]]
    with_paper = [c for c in columns if any(c in paper.get(label, {}) for label in labels)]
    shown = [x for c in columns for x in ([c, f"{c} (paper)"] if c in with_paper else [c])]
    best = best_values(table)
    lines = [f"**{table['caption']}**", ""] if table.get("caption") else []
    lines += _header("", shown)
    for row in table["rows"]:
        cells = []
        for column in columns:
            value = row.get("values", {}).get(column)
            fixed = _fixed(table, column)
            is_best = column in best and _mean(value) is not None and _number(_mean(value), fixed) == best[column]
            cells.append(format_cell(value, fixed, is_best))
            if column in with_paper:
                cells.append(str(paper.get(row["label"], {}).get(column, "")))
        lines.append(_row([row["label"], *cells]))
    if table.get("scale") == "x100":
        lines += ["", "Metrics x100; mean (std) where several seeds ran; the best of each metric column in bold."]
    if table.get("note"):
        lines += ["", table["note"]]
    lines += _p_value_lines(table.get("p_values"))
    lines += _per_seed_lines(table)
    return lines


def _p_value_lines(p_values) -> list[str]:
    if not p_values or not p_values.get("values"):
        return []
    values = p_values["values"]
    metrics = list(dict.fromkeys(m for per_metric in values.values() for m in per_metric))
    lines = ["", f"p-values of a paired t-test against {p_values.get('against', 'the reference')} over the seeds:", ""]
    lines += _header("", metrics)
    lines += [_row([label, *(_number(per.get(m), False) for m in metrics)]) for label, per in values.items()]
    return lines


def _per_seed_lines(table: dict) -> list[str]:
    rows = [row for row in table["rows"] if row.get("per_seed")]
    if not rows:
        return []
    columns = [c for c in table["columns"] if any(c in v for row in rows for v in row["per_seed"].values())]
    lines = ["", "Per seed:", "", _row(["", "seed", *columns]), "|---|---|" + "---:|" * len(columns)]
    for row in rows:
        for seed, values in row["per_seed"].items():
            cells = [format_cell(values.get(c), _fixed(table, c)) for c in columns]
            lines.append(_row([row["label"], str(seed), *cells]))
    return lines


def protocol_line(protocol: dict) -> str:
    """The protocol as one line: dataset, scale, seeds, schedule, machine, preset (those present)."""
    parts = []
    for key in ("dataset", "scale", "seeds", "schedule", "machine", "preset"):
        value = protocol.get(key)
        if value in (None, "", []):
            continue
        if key == "seeds":
            value = ", ".join(str(s) for s in value) if isinstance(value, list) else value
        parts.append(f"{key}: {value}")
    return "; ".join(parts) + "."


def _source_line(summary: dict) -> str:
    if summary["source"] == "transcribed":
        where = summary.get("transcribed_from") or "the README"
        return (f"Source: **transcribed** from {where}; the run files are gone, so these are the numbers as "
                "that text printed them, not regenerated from runs.")  # fmt: skip
    return f"Source: {summary['source']} (built from the run files' summaries)."


def chart_name(summary: dict, n: int) -> str:
    return f"{summary['experiment']}-{n}.png"


def render_page(summary: dict, notes: str, paper: dict) -> str:
    """One experiment's page."""
    protocol = summary.get("protocol") or {}
    lines = [f"# {summary['title']}", "", f"Status: **{summary['status']}**"]
    if summary["status"] != "current":
        lines[-1] += f": {summary['reason']} (see [history](history.md))"
    lines += ["", _source_line(summary), "", f"Protocol: {protocol_line(protocol)}"]
    if summary["commands"]:
        lines += ["", "## Commands", "", "```bash", *summary["commands"], "```"]
    lines += ["", "## Results"]
    table_id, dataset = protocol.get("paper_table"), protocol.get("dataset")
    numbers = paper_rows(paper, table_id, dataset, protocol.get("paper_peft", "")) if table_id else {}
    for n, table in enumerate(summary["tables"], start=1):
        lines += ["", *render_table(table, numbers)]
        if numeric_columns(table):
            lines += ["", f"![{table.get('caption') or 'chart'}]({chart_name(summary, n)})"]
    if table_id:
        note = paper_note(paper, table_id, dataset, shown=bool(numbers))
        if note:
            lines += ["", note]
    if notes.strip():
        lines += ["", notes.strip()]
    return "\n".join(lines) + "\n"


def render_index(summaries: list[dict]) -> str:
    lines = ["# Results", "",
             "Every page here is generated from `results/<experiment>/summary.json` and `notes.md` by "
             "`recbole-perpeft report results/` (do not edit by hand; the format: "
             "[results-format](../results-format.md)); "
             "CI re-renders and fails on a difference. "
             "Superseded and withdrawn experiments: [history](history.md).", "",
             "| experiment | dataset | seeds | status | source |", "|---|---|---:|---|---|"]  # fmt: skip
    for s in summaries:
        protocol = s.get("protocol") or {}
        seeds = protocol.get("seeds")
        count = len(seeds) if isinstance(seeds, list) else (seeds or "")
        lines.append(f"| [{s['title']}]({s['experiment']}.md) | {protocol.get('dataset') or ''} | {count} | "
                     f"{s['status']} | {s['source']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def render_history(summaries: list[dict]) -> str:
    lines = ["# Superseded and withdrawn results", ""]
    old = [s for s in summaries if s["status"] != "current"]
    lines += [f"- [{s['title']}]({s['experiment']}.md): {s['status']}: {s['reason']}" for s in old]
    if not old:
        lines.append("None so far.")
    return "\n".join(lines) + "\n"


def render_all(results_dir, paper: dict | None = None) -> dict[str, str | bytes]:
    """{page file name: Markdown} for every experiment under ``results_dir``, plus README.md and history.md, and
    {``<slug>-<n>.png``: PNG bytes} for each table's chart."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ValueError(f"{results_dir}: no such folder of experiments (results/<experiment>/summary.json).")
    paper = load_paper() if paper is None else paper
    summaries, pages = [], {}
    for path in sorted(results_dir.glob("*/summary.json")):
        summary = load_summary(path)
        notes_file = path.parent / "notes.md"
        notes = notes_file.read_text(encoding="utf-8") if notes_file.is_file() else ""
        pages[f"{summary['experiment']}.md"] = render_page(summary, notes, paper)
        for n, table in enumerate(summary["tables"], start=1):
            chart = bar_chart(table)
            if chart is not None:
                pages[chart_name(summary, n)] = chart
        summaries.append(summary)
    pages["README.md"] = render_index(summaries)
    pages["history.md"] = render_history(summaries)
    return pages


def _same(content: str | bytes, path: Path) -> bool:
    if not path.is_file():
        return False
    if isinstance(content, bytes):  # a chart: its pixel size, as its bytes vary with the matplotlib version
        return png_size(path.read_bytes()) == png_size(content)
    return path.read_text(encoding="utf-8") == content


def _generated(out_dir: Path):
    return [*out_dir.glob("*.md"), *out_dir.glob("*.png")] if out_dir.is_dir() else []


def differing_pages(pages: dict[str, str | bytes], out_dir) -> list[str]:
    """The pages whose committed copy under ``out_dir`` differs or is missing, and committed pages with no summary."""
    out_dir = Path(out_dir)
    differ = [name for name, content in pages.items() if not _same(content, out_dir / name)]
    stale = [p.name for p in _generated(out_dir) if p.name not in pages]
    return sorted(differ + stale)


def write_pages(pages: dict[str, str | bytes], out_dir) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, content in pages.items():
        if isinstance(content, bytes):
            (out_dir / name).write_bytes(content)
        else:
            (out_dir / name).write_text(content, encoding="utf-8")
    for stale in _generated(out_dir):  # a page or chart whose summary (or table) was removed
        if stale.name not in pages:
            stale.unlink()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="recbole-perpeft report", description=__doc__.split("\n\n")[0])
    parser.add_argument("results_dir", nargs="?", default="results", help="folder of <experiment>/summary.json")
    parser.add_argument("--out", default=None, help="where the pages go (default: docs/results beside results_dir)")
    parser.add_argument("--check", action="store_true", help="compare with the committed pages; exit 1 on a diff")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.results_dir).resolve().parent / "docs" / "results"
    try:
        pages = render_all(args.results_dir)
    except ValueError as error:
        print(f"[report] {error}", file=sys.stderr)
        return 2
    if args.check:
        differ = differing_pages(pages, out)
        if differ:
            print(f"[report] {len(differ)} page(s) under {out} differ from the summaries (run "
                  f"`recbole-perpeft report {args.results_dir}` and commit): " + ", ".join(differ), file=sys.stderr)
            return 1
        print(f"[report] {len(pages)} pages under {out} match the summaries.")
        return 0
    write_pages(pages, out)
    print(f"[report] wrote {len(pages)} pages under {out}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
