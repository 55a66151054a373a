"""The paper's own numbers (paper_tables.yaml beside this file), for a "(paper)" column beside ours."""

from __future__ import annotations

from pathlib import Path

import yaml

PAPER_FILE = Path(__file__).resolve().parent / "paper_tables.yaml"


# Tables transcribed from another source than PAPER_FILE's, in its layout; a table PAPER_FILE has wins.
EXTRA_FILES = (Path(__file__).resolve().parent / "paper_table4.yaml",)


def load_paper(path=PAPER_FILE, extra=None) -> dict:
    """The data file as a dict (``values`` always present), plus the tables of ``extra`` files it lacks
    (default: :data:`EXTRA_FILES` for the default file, none for another); a malformed file is an error
    naming it."""
    path = Path(path)
    extra = (EXTRA_FILES if path == PAPER_FILE else ()) if extra is None else extra
    data = _read(path)
    if data is None:
        print(f"[reproduce] no {path}: the paper's numbers are not shown", flush=True)
        data = {"values": {}}
    for file in extra:
        more = _read(Path(file)) or {"values": {}}
        for table, datasets in more["values"].items():
            if str(table) not in {str(t) for t in data["values"]}:
                data["values"][table] = datasets
                data["tables"] = {**(data.get("tables") or {}), table: (more.get("tables") or {}).get(table, table)}
    return data


def _read(path: Path) -> dict | None:
    if not path.is_file():
        return None
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    values = (data.get("values") or {}) if isinstance(data, dict) else None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping with 'values: {{table: {{dataset: ...}}}}'.")
    for table, datasets in values.items():
        for dataset, blocks in (datasets or {}).items():
            for block, rows in (blocks or {}).items():
                for row, metrics in (rows or {}).items():
                    if not isinstance(metrics, dict) or any(not isinstance(v, (str, int, float)) for v in
                                                            metrics.values()):  # fmt: skip
                        raise ValueError(f"{path}: values.{table}.{dataset}.{block}.{row} must map metric keys "
                                         "(hit@20, ...) to numbers as the paper prints them.")  # fmt: skip
    return {**data, "values": dict(values)}


def paper_rows(paper: dict, table: str, dataset: str, block: str) -> dict:
    """{row name: {metric: number as printed}} of one block of one table for ``dataset`` ({} if none)."""
    blocks = ((paper.get("values") or {}).get(str(table)) or {}).get(dataset) or {}
    return {row: dict(metrics) for row, metrics in (blocks.get(block) or {}).items()}


def paper_note(paper: dict, table: str, dataset: str, shown: bool) -> str | None:
    """One line on where the "(paper)" numbers come from, or why there are none (None for tables the paper
    has no counterpart of here, such as ``missing``)."""
    name = (paper.get("tables") or {}).get(str(table))
    if name is None:
        return None
    source = paper.get("source", "the paper")
    paper_dataset = (paper.get("datasets") or {}).get(dataset)
    if shown:
        return f'"(paper)" columns: {name} of {source}, {paper_dataset or dataset}, copied as printed.'
    if paper_dataset is None:
        return f"The paper ({source}) has no {dataset}: no paper numbers to show beside ours."
    return (f"The paper's {name} numbers for {paper_dataset} are not recorded yet "
            f"(recbole_perpeft/reproduce/paper_tables.yaml says why).")  # fmt: skip
