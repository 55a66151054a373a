"""reproduce(): run a table's rows over seeds (recbole_perpeft.compare.run_rows: resumable, stage 1 shared where
the settings agree) and write its JSON, Markdown and PNG into one folder."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from recbole_perpeft.compare import Row, aggregate, is_grouped, resolve_seeds, run_rows, summarise
from recbole_perpeft.config_values import choice
from recbole_perpeft.reproduce.paper import load_paper, paper_note, paper_rows
from recbole_perpeft.reproduce.report import bar_chart, line_chart, render_document
from recbole_perpeft.reproduce.tables import (
    OWN_SCHEDULE,
    REFERENCE,
    TABLES,
    blocks_of,
    default_peft,
    parse_peft,
    rows_of,
    table_entries,
)

DEFAULT_SEEDS = 3  # the paper's tables report means over seeds


def default_result_dir(table: str, dataset: str) -> Path:
    return Path(f"reproduce-{dataset}-missing" if table == "missing" else f"reproduce-{dataset}-table{table}")


def resolve_config(dataset: str, config_file_list=None, overrides=None):
    """The run's settings as a two-stage row sees them (stage epochs, seed, modalities, image_dir)."""
    from recbole_perpeft.config import Config

    return Config(model=REFERENCE, dataset=dataset, config_file_list=config_file_list, config_dict=dict(overrides))


def _has_files(folder: Path) -> bool:
    return folder.is_dir() and next((p for p in folder.iterdir() if p.is_file()), None) is not None


def missing_images_reason(config) -> str | None:
    """Why the dataset has no item images (so rows that remove a modality mean nothing), or None."""
    modalities = config["modalities"]
    if modalities is not None and "image" not in modalities:
        return f"the dataset is text-only (its config sets modalities: {list(modalities)})"
    if config["image_field"]:
        return None  # image paths are a .item column: the runs read them
    image_dir = Path(str(config["image_dir"]))
    if not _has_files(image_dir):
        from recbole_perpeft.data.utils import ensure_dataset_files

        ensure_dataset_files(config)  # a known dataset is prepared (images downloaded) here, as its first run would
        if not _has_files(image_dir):
            return f"the dataset has no item images (nothing in image_dir={image_dir}; set --image_dir)"
    return None


def check_row_configs(rows, dataset: str, config_file_list, overrides) -> None:
    """Build every row's Config before anything trains: an unknown model or key (e.g. a model file not yet
    written) fails now, naming the row, not hours into the table."""
    from recbole_perpeft.config import Config

    for row in rows:
        try:
            Config(model=row.model, dataset=dataset, config_file_list=config_file_list,
                   config_dict={**overrides, **row.overrides})  # fmt: skip
        except (ValueError, KeyError) as err:
            raise ValueError(f"row {row.label!r} ({row.model}, {row.overrides}): {err}") from err


def equal_training(entries, config, overrides) -> tuple[list, dict]:
    """Single-stage rows train ``stage1_epochs + stage2_epochs`` epochs (the paper's equal training), unless
    ``--epochs`` or the row itself says otherwise; two-stage rows train their stages; the OWN_SCHEDULE models
    (LATTICE, BM3) their YAML's (early stopping)."""
    stage1, stage2 = int(config["stage1_epochs"]), int(config["stage2_epochs"])
    info = {"stage1_epochs": stage1, "stage2_epochs": stage2}
    if "epochs" in overrides:
        return entries, {**info, "epochs": overrides["epochs"], "single_stage_epochs": None}
    epochs = stage1 + stage2
    rows = {}
    for row in rows_of(entries):
        single = not is_grouped(row.model) and "epochs" not in row.overrides and row.model not in OWN_SCHEDULE
        rows[row.label] = Row(row.label, row.model, {**row.overrides, "epochs": epochs}) if single else row
    return [dataclasses.replace(e, row=rows[e.row.label]) for e in entries], {**info, "single_stage_epochs": epochs}


def select_rows(entries, only) -> list:
    """The entries named in ``only`` (--rows); a name the table does not have is an error listing its names."""
    names = [n.strip() for n in only.split(",")] if isinstance(only, str) else [str(n).strip() for n in only]
    known = list(dict.fromkeys(e.name for e in entries))
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"--rows: {', '.join(map(repr, unknown)) or 'nothing'} is not a row of this table; its rows "
                         f"are {', '.join(known)}.")
    return [e for e in entries if e.name in names]


def valid_metric(config, metrics) -> str:
    """The metric the runs select on (``valid_metric``, hit@30), if the tests report it; else the first."""
    metric = str(config["valid_metric"]).lower()
    return metric if metric in metrics else metrics[0]


def reproduce(table, dataset: str, peft=None, seeds=DEFAULT_SEEDS, result_dir=None, config_file_list=None,
              overrides=None, entries=None, paper=None, only=None, extend=False, jobs=1) -> dict:  # fmt: skip
    """Run (or reuse) every row of ``table`` ('2', '3', '4', 'missing'; recbole_perpeft/reproduce/tables.py) over
    ``seeds`` and write ``<result_dir>/<stem>.json``, ``.md`` and ``.png`` (stem: table2, table3, missing), the
    runs in ``<result_dir>/runs/``; return the JSON dict. ``entries`` replaces the table's rows (tests, other
    tables); ``paper`` replaces the paper's numbers (paper_tables.yaml); ``only`` (row names as the table prints
    them, e.g. ['w/o MM', 'GlobalPEFT', 'PerPEFT']) runs and reports those rows alone: the cheap part of a table
    first, its runs reused when the whole table runs later. ``extend``: finished runs of a shorter schedule
    (e.g. the table at 10 epochs, asked now at 30) are continued by --resume (recbole_perpeft/extend_runs.py).
    ``jobs``: runs at once, each a subprocess (compare.run_rows)."""
    table = choice(str(table), TABLES, "--table")
    overrides = dict(overrides or {})
    if "peft_type" in overrides:
        raise ValueError("--peft_type: a table sets the PEFT type of each row; choose them with --peft=LORA,IA3,...")
    peft_types = parse_peft(default_peft(table) if peft is None else peft)
    entries = list(entries) if entries is not None else table_entries(table, peft_types)
    config = resolve_config(dataset, config_file_list, overrides)
    entries, training = equal_training(entries, config, overrides)
    table_rows = rows_of(entries)  # (a --rows call shares the stage 1 of the other rows' finished runs)
    if only:
        entries = select_rows(entries, only)
    rows, table_blocks = rows_of(entries), blocks_of(entries)  # (both check the entries)
    check_row_configs(rows, dataset, config_file_list, overrides)
    seed_list = resolve_seeds(seeds, config["seed"])
    result_dir = Path(result_dir or default_result_dir(table, dataset))
    stem = "missing" if table == "missing" else f"table{table}"
    needing = {e.row.label for e in entries if e.needs_images}
    reason = missing_images_reason(config) if needing else None
    skipped = {label: reason for label in needing} if reason else {}

    runs, test_results = run_rows(rows, dataset, seed_list, result_dir / "runs", config_file_list, overrides,
                                  log="reproduce", skip=lambda row: skipped.get(row.label),
                                  stage1_from=table_rows, extend=extend, jobs=jobs)  # fmt: skip
    if not test_results:
        raise ValueError(f"nothing to report on {dataset}: every row was skipped ({reason}).")

    paper = load_paper() if paper is None else paper
    blocks = []
    for title, block in table_blocks.items():
        present = [e for e in block if e.row.label in test_results]
        if not present:
            continue
        names = [e.name for e in present]
        summary = summarise(dataset, names, seed_list, {e.name: test_results[e.row.label] for e in present},
                            reference=REFERENCE if REFERENCE in names else names[-1],
                            runs={e.name: runs[e.row.label] for e in present})  # fmt: skip
        numbers = {name: values for name, values in paper_rows(paper, table, dataset, title).items() if name in names}
        blocks.append({"title": title, "x": present[0].x, "rows": {e.name: e.row.label for e in present},
                       "summary": summary, "paper": numbers})  # fmt: skip
    metric = valid_metric(config, blocks[0]["summary"]["metrics"])
    payload = {
        "table": table,
        "dataset": dataset,
        "peft": peft_types,
        "seeds": seed_list,
        "config_files": list(config_file_list or []),
        "overrides": overrides,
        "equal_training": training,
        "metric": metric,
        "rows": {row.label: {"model": row.model, "overrides": row.overrides,
                             "runs": {str(s): p for s, p in runs.get(row.label, {}).items()},
                             "results": aggregate({row.label: test_results[row.label]}, seeds=seed_list)[row.label]
                             if row.label in test_results else None} for row in rows},  # fmt: skip
        "skipped": skipped,
        "blocks": blocks,
        "paper_note": paper_note(paper, table, dataset, shown=any(b["paper"] for b in blocks)),
    }
    return write_outputs(payload, result_dir, stem)


def write_outputs(payload: dict, result_dir: Path, stem: str) -> dict:
    """``<stem>.json`` (whole, via a rename), ``<stem>.md`` (printed too) and ``<stem>.png``."""
    from recbole_perpeft.data.cache_files import atomic_output

    result_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": result_dir / f"{stem}.json", "markdown": result_dir / f"{stem}.md",
             "chart": result_dir / f"{stem}.png"}  # fmt: skip
    payload = {**payload, "files": {k: str(v) for k, v in files.items()}}
    (line_chart if payload["table"] == "missing" else bar_chart)(payload, files["chart"])
    markdown = render_document(payload)
    files["markdown"].write_text(markdown, encoding="utf-8")
    with atomic_output(str(files["json"])) as tmp, open(tmp, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    print("\n" + markdown, flush=True)
    print(f"[reproduce] written {files['json']}, {files['markdown']} and {files['chart']}", flush=True)
    return payload
