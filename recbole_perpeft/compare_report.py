"""The comparison's statistics and report (pure functions of result dictionaries; no training).

- Aggregation, per model and test metric (``hit@20``, ``hit@30``, ``ndcg@20``, ``ndcg@30``, or whichever
  ``metric@k`` keys all runs have): mean and sample standard deviation (ddof=1; 0 with one seed).
- Paired t-test (``scipy.stats.ttest_rel``) of the reference model against every other model, per metric,
  over the seeds both ran: ``NaN`` (``null`` in the JSON, ``n/a`` in the table) with fewer than two seeds or
  identical values.
- Output: the result JSON ``{dataset, seeds, models, metrics, runs: {model: {seed: path}},
  results: {model: {metric: {mean, std, per_seed}}}, ttest: {reference, p_values: {model: {metric: p}}}}``
  (:func:`summarise`) and a Markdown table (:func:`render_markdown`: metrics x100, ``mean (std)``, best mean
  per column in bold, ``†`` where the reference differs with p < 0.05) and a table of the p-values;
  :func:`write_report` writes both.

The runs themselves: recbole_perpeft/compare.py."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np

PAPER_METRICS = ("hit@20", "hit@30", "ndcg@20", "ndcg@30")
METRIC_ORDER = ("hit", "ndcg")  # then any other metric, alphabetically
SIGNIFICANCE = 0.05
MARKER = "†"


def _metric_key(metric: str):
    name, _, k = metric.partition("@")
    rank = METRIC_ORDER.index(name) if name in METRIC_ORDER else len(METRIC_ORDER)
    return rank, name, int(k) if k.isdigit() else math.inf, metric


def common_metrics(test_results) -> list[str]:
    """``metric@k`` keys present in every test result, hit then ndcg then others, by k.

    ``test_results``: {model: {seed: {metric: value}}}."""
    key_sets = [
        {m for m, v in result.items() if "@" in m and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for per_seed in test_results.values()
        for result in per_seed.values()
    ]
    if not key_sets:
        raise ValueError("no results to compare.")
    metrics = set.intersection(*key_sets)
    if not metrics:
        raise ValueError("the runs have no metric@k test metric in common.")
    return sorted(metrics, key=_metric_key)


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        raise ValueError("mean_std of no values.")
    std = float(np.std(values, ddof=1)) if values.size > 1 else 0.0
    return float(np.mean(values)), std


def aggregate(test_results, metrics=None, seeds=None) -> dict:
    """{model: {seed: test_result}} -> {model: {metric: {mean, std, per_seed}}}.

    ``per_seed`` follows ``seeds`` (default: each model's seeds in their order), skipping seeds a model
    lacks; ``metrics`` default: :func:`common_metrics`."""
    metrics = list(metrics) if metrics is not None else common_metrics(test_results)
    summary = {}
    for model, per_seed in test_results.items():
        order = [s for s in seeds if s in per_seed] if seeds is not None else list(per_seed)
        summary[model] = {}
        for metric in metrics:
            values = [float(per_seed[s][metric]) for s in order]
            mean, std = mean_std(values)
            summary[model][metric] = {"mean": mean, "std": std, "per_seed": values}
    return summary


def paired_ttest(a, b) -> float:
    """Two-sided p-value of scipy's paired t-test; NaN with fewer than two pairs or identical values."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired t-test needs the same number of values, got {a.size} and {b.size}.")
    if a.size < 2 or np.array_equal(a, b):
        return math.nan
    from scipy.stats import ttest_rel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # constant differences: scipy warns, t is +-inf
        return float(ttest_rel(a, b).pvalue)


def ttest_p_values(test_results, reference: str, metrics=None) -> dict:
    """{model: {metric: p}} of ``reference`` against every other model, paired by the seeds both ran."""
    if reference not in test_results:
        raise ValueError(f"--ttest={reference}: not one of the compared models ({', '.join(test_results)}).")
    metrics = list(metrics) if metrics is not None else common_metrics(test_results)
    ref = test_results[reference]
    p_values = {}
    for model, per_seed in test_results.items():
        if model == reference:
            continue
        paired = [s for s in ref if s in per_seed]
        p_values[model] = {
            metric: paired_ttest([ref[s][metric] for s in paired], [per_seed[s][metric] for s in paired])
            for metric in metrics
        }
    return p_values


def _format_p(p) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "n/a"
    text = "<0.001" if p < 0.001 else f"{p:.3f}"
    return f"{text} {MARKER}" if p < SIGNIFICANCE else text


def _significant(p) -> bool:
    return p is not None and not (isinstance(p, float) and math.isnan(p)) and p < SIGNIFICANCE


def table_header(metrics) -> list[str]:
    return ["| Model | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]


def _paper_metrics(metrics, models, paper) -> set[str]:
    """The metrics with a number from the paper for at least one of ``models``."""
    return {metric for metric in metrics if any(paper.get(m, {}).get(metric) is not None for m in models)}


def render_markdown(summary: dict, title: str | None = None, paper: dict | None = None) -> str:
    """The comparison JSON (:func:`summarise`'s dict) as Markdown: metrics x100 with 2 decimals,
    ``mean (std)``, the best mean per column in bold, ``†`` on a model's cell where the paired t-test
    against the reference gives p < 0.05, then the p-values.

    ``title``: the first line (default: what the numbers are, on which dataset and seeds). ``paper``:
    {model: {metric: number as the paper prints it}}; a metric with any such number gets a ``<metric> (paper)``
    column right after ours, the paper's text copied as it is (blank where the paper has none)."""
    models, metrics, results = summary["models"], summary["metrics"], summary["results"]
    seeds = summary.get("seeds", [])
    ttest = summary.get("ttest") or {}
    reference, p_values = ttest.get("reference"), ttest.get("p_values") or {}
    paper = paper or {}
    with_paper = _paper_metrics(metrics, models, paper)

    def shown(value):
        return f"{value * 100:.2f}"

    best = {metric: max(results[m][metric]["mean"] for m in models) for metric in metrics}
    columns = [c for metric in metrics for c in ([metric, f"{metric} (paper)"] if metric in with_paper else [metric])]
    if title is None:
        plural = "s" if len(seeds) != 1 else ""
        title = (f"Test metrics on {summary.get('dataset')} (x100): mean (std) over {len(seeds)} seed{plural} "
                 f"({', '.join(str(s) for s in seeds)}); best mean in bold.")  # fmt: skip
    lines = [title, "", *table_header(columns)]
    for model in models:
        cells = []
        for metric in metrics:
            entry = results[model][metric]
            mean = shown(entry["mean"])
            if mean == shown(best[metric]):
                mean = f"**{mean}**"
            cell = f"{mean} ({shown(entry['std'])})"
            if _significant(p_values.get(model, {}).get(metric)):
                cell += MARKER
            cells.append(cell)
            if metric in with_paper:
                value = paper.get(model, {}).get(metric)
                cells.append("" if value is None else str(value))
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    compared = [m for m in models if m != reference and m in p_values]
    if reference is not None and compared:  # a table of the reference row alone has no p-values to show
        lines += [
            "",
            f"{MARKER} p < {SIGNIFICANCE} in a paired t-test against {reference} over the seeds. "
            f"p-values vs {reference}:",
            "",
            *table_header(metrics),
        ]
        for model in compared:
            lines.append(
                f"| {model} | " + " | ".join(_format_p(p_values[model].get(metric)) for metric in metrics) + " |"
            )
    return "\n".join(lines) + "\n"


def _nan_to_none(value):
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def summarise(dataset, models, seeds, test_results, reference=None, runs=None, metrics=None) -> dict:
    """The comparison's JSON payload from {model: {seed: test_result}} (pure; NaN p-values -> None)."""
    reference = reference or models[-1]
    metrics = list(metrics) if metrics is not None else common_metrics(test_results)
    return _nan_to_none(
        {
            "dataset": dataset,
            "seeds": list(seeds),
            "models": list(models),
            "metrics": metrics,
            "runs": {m: {str(s): str(p) for s, p in (runs or {}).get(m, {}).items()} for m in models},
            "results": aggregate({m: test_results[m] for m in models}, metrics, seeds),
            "ttest": {"reference": reference, "p_values": ttest_p_values(test_results, reference, metrics)},
        }
    )


def write_report(summary: dict, result_file, markdown_file) -> str:
    """Write :func:`summarise`'s dict as the result JSON and its :func:`render_markdown` beside it; return the
    Markdown. The JSON is renamed into place whole (an interrupted write never leaves half a file)."""
    # Imported here: importing recbole_perpeft.data brings RecBole and torch, which the statistics do not need.
    from recbole_perpeft.data.cache_files import atomic_output

    markdown = render_markdown(summary)
    result_file, markdown_file = Path(result_file), Path(markdown_file)
    result_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(str(result_file)) as tmp, open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    markdown_file.parent.mkdir(parents=True, exist_ok=True)
    markdown_file.write_text(markdown)
    return markdown
