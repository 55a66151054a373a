"""The results pages: rendering of a small summary, the committed docs/results against results/ (CI fails on a
diff), and compare/reproduce JSON -> summary."""

import json
from pathlib import Path

import pytest

from recbole_perpeft.compare_report import summarise
from recbole_perpeft.experiments import results_charts, results_report
from recbole_perpeft.experiments.summaries import summary_from_comparison

ROOT = Path(__file__).resolve().parent.parent


def small_summary(status="current", reason=None):
    return {
        "experiment": "tiny",
        "title": "A tiny comparison",
        "source": "transcribed",
        "transcribed_from": "README.md at b057acf, section 'Tiny'",
        "status": status,
        "reason": reason,
        "protocol": {"preset": "recbole", "dataset": "amazon-sports", "scale": "1% of users", "seeds": [2024, 2025],
                     "schedule": "3 + 7", "machine": "2-core CPU", "paper_table": "2", "paper_peft": "LORA"},
        "commands": ["python -m recbole_perpeft.compare --models=A,B"],
        "tables": [{
            "caption": "Test metrics",
            "columns": ["hit@20", "ndcg@20", "s / epoch"],
            "scale": "x100",
            "rows": [
                {"label": "GlobalPEFT", "values": {"hit@20": {"mean": 9.3, "std": 0.41, "mark": "†"}, "ndcg@20": 3.1,
                                                    "s / epoch": 0.8}},
                {"label": "PerPEFT", "values": {"hit@20": {"mean": 9.1, "std": None}, "ndcg@20": "—",
                                                 "s / epoch": 116},
                 "per_seed": {"2024": {"hit@20": 9.0}, "2025": {"hit@20": 9.2}}},
            ],
            "p_values": {"against": "PerPEFT", "values": {"GlobalPEFT": {"hit@20": 0.038}}},
            "note": "One line under the table.",
        }],
    }


PAPER = {"source": "https://arxiv.org/html/2602.09445", "tables": {"2": "Table 2"},
         "datasets": {"amazon-sports": "Sports & Outdoors"},
         "values": {"2": {"amazon-sports": {"LORA": {"PerPEFT": {"hit@20": "4.82 (.04)"}}}}}}


def write_experiment(root: Path, summary: dict, notes: str = "## Question\n\nDoes it?\n") -> None:
    folder = root / summary["experiment"]
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "notes.md").write_text(notes)


def test_table_prints_as_the_paper_does():
    lines = results_report.render_table(small_summary()["tables"][0], PAPER["values"]["2"]["amazon-sports"]["LORA"])
    text = "\n".join(lines)
    # x100 metric columns with 2 decimals, the best in bold; other columns as stored; strings verbatim
    assert "| GlobalPEFT | **9.30** (0.41)† |  | **3.10** | 0.8 |" in text  # a significance mark as printed
    assert "| PerPEFT | 9.10 | 4.82 (.04) | — | 116 |" in text
    assert "| hit@20 | hit@20 (paper) | ndcg@20 | s / epoch |" in text  # the paper's number beside ours
    assert "| GlobalPEFT | 0.038 |" in text  # p-values as stored
    assert "| PerPEFT | 2025 | 9.20 |" in text  # per seed
    assert "One line under the table." in text


def test_page_index_and_history(tmp_path):
    write_experiment(tmp_path / "results", small_summary())
    old = {**small_summary("withdrawn", "trained 3 + 3 epochs against 3"), "experiment": "old", "title": "Old one"}
    write_experiment(tmp_path / "results", old)
    pages = results_report.render_all(tmp_path / "results", paper=PAPER)
    assert sorted(pages) == ["README.md", "history.md", "old-1.png", "old.md", "tiny-1.png", "tiny.md"]
    page = pages["tiny.md"]
    assert page.startswith("# A tiny comparison\n\nStatus: **current**")
    assert "**transcribed** from README.md at b057acf, section 'Tiny'" in page
    assert "Protocol: dataset: amazon-sports; scale: 1% of users; seeds: 2024, 2025; schedule: 3 + 7" in page
    assert "```bash\npython -m recbole_perpeft.compare --models=A,B\n```" in page
    assert '"(paper)" columns: Table 2 of https://arxiv.org/html/2602.09445, Sports & Outdoors' in page
    assert page.rstrip().endswith("## Question\n\nDoes it?")
    assert "| [Old one](old.md) | amazon-sports | 2 | withdrawn | transcribed |" in pages["README.md"]
    assert "- [Old one](old.md): withdrawn: trained 3 + 3 epochs against 3" in pages["history.md"]
    assert "tiny" not in pages["history.md"]
    assert results_report.render_all(tmp_path / "results", paper=PAPER) == pages  # deterministic


def test_check_lists_differing_and_stale_pages(tmp_path, capsys):
    results, out = tmp_path / "results", tmp_path / "docs"
    write_experiment(results, small_summary())
    assert results_report.main([str(results), f"--out={out}"]) == 0
    assert results_report.main([str(results), f"--out={out}", "--check"]) == 0
    (out / "tiny.md").write_text("edited by hand\n")
    (out / "gone.md").write_text("a page whose summary was removed\n")
    assert results_report.main([str(results), f"--out={out}", "--check"]) == 1
    assert "gone.md, tiny.md" in capsys.readouterr().err


def test_bad_summary_is_one_line_naming_the_file(tmp_path, capsys):
    summary = small_summary("superseded")  # no reason
    write_experiment(tmp_path / "results", summary)
    assert results_report.main([str(tmp_path / "results"), f"--out={tmp_path / 'docs'}"]) == 2
    err = capsys.readouterr().err
    assert "tiny/summary.json: a superseded experiment needs a one-line 'reason'" in err
    assert not (tmp_path / "docs").exists()


def test_summary_from_a_comparison_table(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "A-seed1.json").write_text(json.dumps({"config": {"lr": 0.001, "seed": 1}}))
    results = {"A": {1: {"hit@20": 0.10, "ndcg@20": 0.05}, 2: {"hit@20": 0.12, "ndcg@20": 0.06}},
               "PerPEFT": {1: {"hit@20": 0.13, "ndcg@20": 0.07}, 2: {"hit@20": 0.16, "ndcg@20": 0.07}}}
    table = summarise("ml-100k", ["A", "PerPEFT"], [1, 2], results, runs={"A": {1: runs / "A-seed1.json"}})
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    summary = summary_from_comparison(path, "fake", "A fake table", ["python -m recbole_perpeft.compare ..."],
                                      scale="all users", schedule="3")
    assert summary["source"] == "runs" and summary["protocol"]["seeds"] == [1, 2]
    rows = {row["label"]: row for row in summary["tables"][0]["rows"]}
    assert rows["A"]["values"]["hit@20"]["mean"] == 11.0 and rows["A"]["values"]["hit@20"]["std"] == 1.41
    assert rows["PerPEFT"]["per_seed"]["2"] == {"hit@20": 16.0, "ndcg@20": 7.0}
    assert summary["tables"][0]["p_values"]["against"] == "PerPEFT"
    assert set(summary["config_fingerprints"]) == {"A"} and len(summary["config_fingerprints"]["A"]["1"]) == 16
    folder = tmp_path / "results" / "fake"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    page = results_report.render_all(tmp_path / "results", paper={"values": {}})["fake.md"]
    assert "| PerPEFT | **14.50** (2.12) | **7.00** (0.00) |" in page


def test_row_without_label_is_refused(tmp_path):
    summary = small_summary()
    del summary["tables"][0]["rows"][0]["label"]
    write_experiment(tmp_path / "results", summary)
    with pytest.raises(ValueError, match=r"tiny/summary.json: every row of tables\[0\] needs a 'label'"):
        results_report.render_all(tmp_path / "results", paper=PAPER)


def test_summary_from_something_else_is_refused():
    with pytest.raises(ValueError, match="neither a compare result"):
        summary_from_comparison({"rows": []}, "x", "x", [])


def test_committed_pages_match_the_summaries(tmp_path):
    """docs/results is exactly what results/ renders to (CI runs this test): edit the summary, then re-render."""
    if not (ROOT / "results").is_dir() and not (ROOT / "docs" / "results").is_dir():
        pytest.skip(f"neither results/ nor docs/results under {ROOT} (not a source checkout): nothing to check")
    assert (ROOT / "results").is_dir(), "docs/results is committed but results/ (its source) is missing"
    pages = results_report.render_all(ROOT / "results")
    assert len(pages) > 2
    differ = results_report.differing_pages(pages, ROOT / "docs" / "results")
    assert differ == [], (f"docs/results differs from results/ in {differ}: run "
                          "`python -m recbole_perpeft.experiments.results_report results/` and commit.")


def test_summary_from_a_reproduce_table_shows_the_papers_numbers(tmp_path):
    results = {"GlobalPEFT": {1: {"hit@20": 0.04}, 2: {"hit@20": 0.05}},
               "PerPEFT": {1: {"hit@20": 0.05}, 2: {"hit@20": 0.06}}}
    block = summarise("amazon-sports", ["GlobalPEFT", "PerPEFT"], [1, 2], results)
    payload = {"table": "2", "dataset": "amazon-sports", "peft": ["LORA"], "seeds": [1, 2],
               "rows": {"GlobalPEFT-LORA": {"runs": {}}}, "blocks": [{"title": "LORA", "summary": block}]}
    summary = summary_from_comparison(payload, "sports", "Table 2 on Sports", [])
    assert summary["protocol"]["paper_table"] == "2" and summary["protocol"]["paper_peft"] == "LORA"
    assert [t["caption"] for t in summary["tables"]] == ["LORA"]
    folder = tmp_path / "results" / "sports"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    page = results_report.render_all(tmp_path / "results", paper=PAPER)["sports.md"]
    assert "| PerPEFT | **5.50** (0.71) | 4.82 (.04) |" in page  # the paper's number beside ours, matched by label
    assert "| GlobalPEFT | 4.50 (0.71) |  |" in page


def test_each_numeric_table_gets_a_linked_chart_checked_by_size(tmp_path, capsys):
    """A table with numbers becomes <slug>-<n>.png, linked under it; --check compares a chart's pixel size."""
    results, out = tmp_path / "results", tmp_path / "docs"
    summary = small_summary()
    summary["tables"].append({"caption": "words only", "columns": ["what"], "rows": [{"label": "a",
                                                                                       "values": {"what": "x (y)"}}]})
    write_experiment(results, summary)
    assert results_report.main([str(results), f"--out={out}"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["tiny-1.png"]  # the words-only table has no chart
    page = (out / "tiny.md").read_text()
    assert page.count("](tiny-") == 1 and "(tiny-1.png)" in page
    chart = (out / "tiny-1.png").read_bytes()
    assert results_charts.png_size(chart)[0] > 100
    assert results_charts.bar_chart(summary["tables"][0]) == chart  # the same bytes on the same matplotlib
    assert b"Software" not in chart  # no matplotlib version stamp in the file
    (out / "tiny-1.png").write_bytes(results_charts.bar_chart({**summary["tables"][0], "columns": ["hit@20"] * 4}))
    (out / "gone-1.png").write_bytes(chart)
    assert results_report.main([str(results), f"--out={out}", "--check"]) == 1
    assert "gone-1.png, tiny-1.png" in capsys.readouterr().err
    assert results_report.main([str(results), f"--out={out}"]) == 0
    assert not (out / "gone-1.png").exists()


def test_chart_reads_numbers_printed_as_strings():
    assert results_charts.cell_number("2,001") == (2001.0, None)
    assert results_charts.cell_number({"mean": 37.03, "std": "3.50"}) == (37.03, 3.5)
    assert results_charts.cell_number("16.5 (0.25)") is None
    assert results_charts.numeric_columns({"columns": ["a", "b"], "rows": [{"label": "r", "values": {"a": "-"}}]}) == []
