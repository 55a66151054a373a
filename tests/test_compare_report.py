"""recbole_perpeft.compare_report: aggregation, paired t-tests, the JSON summary and the Markdown table (pure
functions of result dictionaries), and their writing."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from recbole_perpeft import compare as cmp
from recbole_perpeft import compare_report as report


def results_table():
    """{model: {seed: test_result}} with known numbers."""
    return {
        "A": {
            1: {"hit@20": 0.1, "ndcg@20": 0.05, "hit@30": 0.2, "ndcg@30": 0.06, "recall@20": 0.4},
            2: {"hit@20": 0.2, "ndcg@20": 0.05, "hit@30": 0.3, "ndcg@30": 0.07},
            3: {"hit@20": 0.3, "ndcg@20": 0.05, "hit@30": 0.4, "ndcg@30": 0.08},
        },
        "B": {
            1: {"hit@20": 0.30, "ndcg@20": 0.10, "hit@30": 0.35, "ndcg@30": 0.06},
            2: {"hit@20": 0.32, "ndcg@20": 0.12, "hit@30": 0.45, "ndcg@30": 0.07},
            3: {"hit@20": 0.35, "ndcg@20": 0.11, "hit@30": 0.55, "ndcg@30": 0.08},
        },
    }


def test_common_metrics_are_shared_topk_keys_hit_then_ndcg_by_k():
    table = results_table()
    assert report.common_metrics(table) == ["hit@20", "hit@30", "ndcg@20", "ndcg@30"]  # recall@20: only one run
    other = {"M": {1: {"ndcg@10": 0.1, "hit@5": 0.2, "hit@10": 0.3, "mrr@10": 0.4, "ndcg@5": 0.0, "loss": 1.0}}}
    assert report.common_metrics(other) == ["hit@5", "hit@10", "ndcg@5", "ndcg@10", "mrr@10"]
    with pytest.raises(ValueError):
        report.common_metrics({"A": {1: {"hit@5": 0.1}}, "B": {1: {"ndcg@5": 0.1}}})


def test_aggregate_mean_and_sample_std():
    summary = report.aggregate(results_table())
    a = summary["A"]
    assert a["hit@20"]["mean"] == pytest.approx(0.2) and a["hit@20"]["std"] == pytest.approx(0.1)  # ddof=1
    assert a["hit@20"]["per_seed"] == [0.1, 0.2, 0.3]
    assert a["ndcg@20"]["mean"] == pytest.approx(0.05) and a["ndcg@20"]["std"] == pytest.approx(0.0, abs=1e-12)
    assert a["ndcg@30"]["std"] == pytest.approx(0.01)
    b = summary["B"]["hit@30"]
    assert b["mean"] == pytest.approx(0.45) and b["std"] == pytest.approx(0.1)
    assert set(summary["A"]) == {"hit@20", "hit@30", "ndcg@20", "ndcg@30"}

    one = report.aggregate({"A": {5: {"hit@20": 0.25}}})
    assert one["A"]["hit@20"] == {"mean": 0.25, "std": 0.0, "per_seed": [0.25]}
    ordered = report.aggregate(results_table(), metrics=["hit@20"], seeds=[3, 1])
    assert ordered["A"]["hit@20"]["per_seed"] == [0.3, 0.1]


def test_paired_ttest_is_scipys():
    a = [0.30, 0.32, 0.35, 0.31]
    b = [0.25, 0.29, 0.30, 0.28]
    expected = stats.ttest_rel(a, b).pvalue
    assert report.paired_ttest(a, b) == pytest.approx(expected, rel=1e-12)
    # By hand: t = mean(d) / (sd(d) / sqrt(n)), two-sided with n - 1 degrees of freedom.
    d = np.subtract(a, b)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    assert report.paired_ttest(a, b) == pytest.approx(2 * stats.t.sf(abs(t), len(d) - 1), rel=1e-9)
    assert math.isnan(report.paired_ttest([0.1], [0.2]))  # one seed
    assert math.isnan(report.paired_ttest([0.1, 0.2], [0.1, 0.2]))  # identical
    with pytest.raises(ValueError):
        report.paired_ttest([0.1, 0.2], [0.1])


def test_ttest_p_values_against_the_reference_pair_by_seed():
    table = results_table()
    table["C"] = {2: {"hit@20": 0.2, "hit@30": 0.3, "ndcg@20": 0.05, "ndcg@30": 0.07}}  # one seed in common with B
    p = report.ttest_p_values(table, "B", ["hit@20", "ndcg@30"])
    assert set(p) == {"A", "C"}
    assert p["A"]["hit@20"] == pytest.approx(stats.ttest_rel([0.30, 0.32, 0.35], [0.1, 0.2, 0.3]).pvalue)
    assert math.isnan(p["A"]["ndcg@30"])  # identical per seed
    assert math.isnan(p["C"]["hit@20"])  # one paired seed
    with pytest.raises(ValueError, match="Z"):
        report.ttest_p_values(table, "Z")


def test_summarise_is_strict_json_with_nan_as_null():
    summary = report.summarise("ds", ["A", "B"], [1, 2, 3], results_table(), runs={"A": {1: "a1.json"}})
    text = json.dumps(summary, allow_nan=False)  # no NaN in the file
    assert json.loads(text)["ttest"]["p_values"]["A"]["ndcg@30"] is None
    assert summary["ttest"]["reference"] == "B"  # default: the last model
    assert summary["models"] == ["A", "B"] and summary["seeds"] == [1, 2, 3]
    assert summary["metrics"] == ["hit@20", "hit@30", "ndcg@20", "ndcg@30"]
    assert summary["runs"] == {"A": {"1": "a1.json"}, "B": {}}
    assert summary["results"]["A"]["hit@20"]["mean"] == pytest.approx(0.2)


def test_render_markdown_table():
    summary = {
        "dataset": "ds",
        "seeds": [1, 2],
        "models": ["SASRec", "GlobalPEFT", "PerPEFT"],
        "metrics": ["hit@20", "ndcg@20"],
        "results": {
            "SASRec": {"hit@20": {"mean": 0.1, "std": 0.01}, "ndcg@20": {"mean": 0.0512345, "std": 0.0}},
            "GlobalPEFT": {"hit@20": {"mean": 0.123456, "std": 0.004321}, "ndcg@20": {"mean": 0.06, "std": 0.002}},
            "PerPEFT": {"hit@20": {"mean": 0.12, "std": 0.02}, "ndcg@20": {"mean": 0.0599999, "std": 0.001}},
        },
        "ttest": {
            "reference": "PerPEFT",
            "p_values": {
                "SASRec": {"hit@20": 0.0004, "ndcg@20": 0.049},
                "GlobalPEFT": {"hit@20": 0.5, "ndcg@20": None},
            },
        },
    }
    text = report.render_markdown(summary)
    lines = text.splitlines()
    assert "ds" in lines[0] and "2 seeds (1, 2)" in lines[0]
    assert "| Model | hit@20 | ndcg@20 |" in lines
    assert "| SASRec | 10.00 (1.00)† | 5.12 (0.00)† |" in lines
    # Best mean per column in bold (PerPEFT's 5.9999... shows as 6.00: a tie on what the table shows).
    assert "| GlobalPEFT | **12.35** (0.43) | **6.00** (0.20) |" in lines
    assert "| PerPEFT | 12.00 (2.00) | **6.00** (0.10) |" in lines
    assert any("† p < 0.05" in line and "PerPEFT" in line for line in lines)
    assert "| SASRec | <0.001 † | 0.049 † |" in lines
    assert "| GlobalPEFT | 0.500 | n/a |" in lines
    assert not any(line.startswith("| PerPEFT | <") or line.startswith("| PerPEFT | n/a") for line in lines)


def test_render_markdown_of_the_reference_row_alone_has_no_empty_p_value_table():
    summary = report.summarise("ds", ["A"], [1, 2, 3], {"A": results_table()["A"]}, reference="A")
    text = report.render_markdown(summary)
    assert "| A | " in text
    assert "p-values" not in text and "†" not in text
    two = report.render_markdown(report.summarise("ds", ["A", "B"], [1, 2, 3], results_table(), reference="B"))
    assert "p-values vs B:" in two and any(line.startswith("| A | 0.") for line in two.splitlines())


def test_report_functions_are_still_importable_from_compare():
    for name in ("aggregate", "common_metrics", "paired_ttest", "ttest_p_values", "summarise", "render_markdown"):
        assert getattr(cmp, name) is getattr(report, name)


def test_write_report_writes_the_json_and_the_markdown(tmp_path):
    summary = report.summarise("ds", ["A", "B"], [1, 2, 3], results_table())
    markdown = report.write_report(summary, tmp_path / "out" / "t.json", tmp_path / "md" / "t.md")
    assert json.loads((tmp_path / "out" / "t.json").read_text()) == summary
    assert (tmp_path / "md" / "t.md").read_text() == markdown == report.render_markdown(summary)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["t.json"]  # no temporary file left


def test_render_markdown_with_a_title_and_the_papers_numbers():
    summary = report.summarise("ds", ["A", "B"], [1, 2, 3], results_table())
    plain = report.render_markdown(summary)
    assert report.render_markdown(summary, paper={}) == plain  # no paper numbers: the table is unchanged
    text = report.render_markdown(summary, title="## LORA", paper={"B": {"hit@30": "45.10", "ndcg@20": 11.5},
                                                                   "C": {"hit@20": "1.00"}})  # fmt: skip
    lines = text.splitlines()
    assert lines[0] == "## LORA"
    # A "(paper)" column after each metric the paper has for a shown model (C is not shown: no hit@20 column).
    assert "| Model | hit@20 | hit@30 | hit@30 (paper) | ndcg@20 | ndcg@20 (paper) | ndcg@30 |" in lines
    # B is the reference (no †); A's hit@30 trails by a constant 15 points (p ~ 0) and its ndcg@20 with p 0.009.
    assert "| B | **32.33** (2.52) | **45.00** (10.00) | 45.10 | **11.00** (1.00) | 11.5 | **7.00** (1.00) |" in lines
    assert "| A | 20.00 (10.00) | 30.00 (10.00)† |  | 5.00 (0.00)† |  | **7.00** (1.00) |" in lines
    # The p-value table keeps our metrics only.
    assert lines.count("| Model | hit@20 | hit@30 | ndcg@20 | ndcg@30 |") == 1
