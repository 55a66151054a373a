"""The JSON that ``recbole_perpeft.compare`` or ``recbole_perpeft.reproduce`` writes, as a committed experiment
summary (``results/<slug>/summary.json``, ``"source": "runs"``), which results_report renders.

Metrics are stored x100 and rounded to 2 decimals (as the pages print them), p-values to 3 significant digits;
each run's config fingerprint (``config_fingerprints``) travels along where the run JSONs are still at hand."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def _x100(value):
    return None if value is None else round(float(value) * 100, 2)


def _p(value):
    return None if value is None else float(f"{float(value):.3g}")


def _table_from_comparison(summary: dict, caption: str) -> dict:
    """One compare_report.summarise dict -> one table of the summary format."""
    metrics, seeds = summary["metrics"], [str(s) for s in summary.get("seeds", [])]
    rows = []
    for model in summary["models"]:
        entry = summary["results"][model]
        several = len(seeds) > 1  # one seed: the value alone (no std, no t-test)
        row = {"label": model,
               "values": {m: {"mean": _x100(entry[m]["mean"]), "std": _x100(entry[m]["std"])} if several
                          else _x100(entry[m]["mean"]) for m in metrics}}  # fmt: skip
        per_seed = [entry[m].get("per_seed") or [] for m in metrics]
        if len(seeds) > 1 and all(len(values) == len(seeds) for values in per_seed):
            row["per_seed"] = {s: {m: _x100(entry[m]["per_seed"][i]) for m in metrics} for i, s in enumerate(seeds)}
        rows.append(row)
    table = {"caption": caption, "columns": list(metrics), "scale": "x100", "rows": rows}
    ttest = summary.get("ttest") or {}
    if ttest.get("p_values") and len(seeds) > 1:
        table["p_values"] = {"against": ttest.get("reference"),
                             "values": {model: {m: _p(p) for m, p in per.items()}
                                        for model, per in ttest["p_values"].items()}}  # fmt: skip
    return table


def _fingerprints(runs: dict) -> dict:
    """{label: {seed: the first 16 hex digits of the sha256 of the run's config (its JSON, keys sorted)}} of the
    run JSONs still on disk (those gone are left out)."""
    found = {}
    for label, per_seed in (runs or {}).items():
        for seed, path in (per_seed or {}).items():
            try:
                result = json.loads(Path(path).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(result, dict) and isinstance(result.get("config"), dict):
                text = json.dumps(result["config"], sort_keys=True, default=str)
                found.setdefault(label, {})[str(seed)] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return found


def summary_from_comparison(table_json, experiment: str, title: str, commands, scale: str = "",
                            schedule: str = "", machine: str = "", preset: str = "recbole", status: str = "current",
                            reason: str | None = None) -> dict:  # fmt: skip
    """A summary dict (results_schema) from a compare result JSON or a reproduce table JSON (path or dict).

    A reproduce JSON gives one table per block (per PEFT type), a compare JSON one table."""
    payload = json.loads(Path(table_json).read_text(encoding="utf-8")) if not isinstance(table_json, dict) \
        else table_json  # fmt: skip
    if "blocks" in payload:
        tables = [_table_from_comparison(b["summary"], b["title"]) for b in payload["blocks"]]
        runs = {label: row.get("runs") for label, row in (payload.get("rows") or {}).items()}
    elif "results" in payload and "models" in payload:
        tables = [_table_from_comparison(payload, f"Test metrics on {payload.get('dataset')}")]
        runs = payload.get("runs") or {}
    else:
        raise ValueError(f"{table_json if not isinstance(table_json, dict) else 'the table'}: neither a compare "
                         "result (models, results) nor a reproduce table (blocks).")  # fmt: skip
    protocol = {"preset": preset, "dataset": payload.get("dataset"), "scale": scale,
                "seeds": list(payload.get("seeds", [])), "schedule": schedule, "machine": machine}  # fmt: skip
    if payload.get("table") in ("2", "3"):
        protocol["paper_table"] = payload["table"]
        if len(payload.get("peft") or []) == 1:
            protocol["paper_peft"] = payload["peft"][0]
    summary = {"experiment": experiment, "title": title, "source": "runs", "transcribed_from": None,
               "status": status, "reason": reason, "protocol": protocol, "commands": list(commands),
               "tables": tables}  # fmt: skip
    fingerprints = _fingerprints(runs)
    if fingerprints:
        summary["config_fingerprints"] = fingerprints
    return summary
