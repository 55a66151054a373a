"""recbole_perpeft.reproduce: the tables' rows, equal training, stage-1 sharing by settings, resumed runs, the
Markdown (bold, †, x100, the paper's column), the PNG charts, the text-only skip, the command line (with a fake
training function), and one real table of tiny runs end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from PIL import Image

from recbole_perpeft import compare as cmp
from recbole_perpeft.compare import Row
from recbole_perpeft.reproduce import Entry, reproduce, runner, table_entries
from recbole_perpeft.reproduce.cli import main as reproduce_main
from recbole_perpeft.reproduce.paper import load_paper, paper_note, paper_rows
from tests.fake_runs import FakeRun, install
from tests.tiny import make_atomic_dataset, table_keys

GROUPED = {"PerPEFT", "GroupLevel1", "GroupLevel2"}
BASE = {"WithoutMM": 0.10, "FrozenMM": 0.15, "GlobalPEFT": 0.20, "UserLevel1": 0.21, "UserLevel2": 0.22,
        "GroupLevel1": 0.23, "GroupLevel2": 0.24, "LargeGlobalPEFT": 0.25, "PerPEFT": 0.30,
        "LATTICE": 0.17, "BM3": 0.16}  # fmt: skip


# --- the rows ----------------------------------------------------------------------------------------------------


def test_table2_has_the_papers_rows_per_peft_and_shares_the_peft_free_ones():
    entries = table_entries("2", "LORA, ia3")
    names = ["w/o MM", "FrozenMM", "GlobalPEFT", "UserLevel1", "UserLevel2", "GroupLevel1", "GroupLevel2", "PerPEFT"]
    for peft in ("LORA", "IA3"):
        block = [e for e in entries if e.block == peft]
        assert [e.name for e in block] == names
        assert all(e.row.overrides == {"peft_type": peft} for e in block[2:])
    without_mm = [e.row for e in entries if e.name == "w/o MM"]
    assert without_mm == [Row("w/o MM", "WithoutMM", {})] * 2  # one row (one run per seed) in both blocks
    assert len({e.row.label for e in entries}) == 2 + 2 * 6


def test_table3_and_missing_rows():
    entries = {e.name: e for e in table_entries("3", "IISAN,LORA") if not e.block.startswith("beyond")}
    assert entries["w/o text"].row.overrides == {"peft_type": "IISAN", "modalities": ["image"]}
    assert entries["w/o image"].row.overrides["modalities"] == ["text"] and entries["w/o text"].needs_images
    assert entries["w/o group negatives"].row.overrides["group_negatives"] is False
    assert entries["random grouping"].row.overrides["grouping_method"] == "random"
    assert entries["LargeGlobalPEFT"].row.model == "LargeGlobalPEFT"
    beyond = [e for e in table_entries("3", "IISAN") if e.block.startswith("beyond")]
    assert [(e.row.model, e.row.overrides.get("soft_groups")) for e in beyond] == [("PerPEFT", 2), ("PerPEFT", None)]

    missing = table_entries("missing", "LORA")
    assert [(e.name, e.x) for e in missing] == [(m, r) for r in (0.0, 0.25, 0.5) for m in ("GlobalPEFT", "PerPEFT")]
    assert missing[0].row == Row("GlobalPEFT LORA", "GlobalPEFT", {"peft_type": "LORA"})  # Table 2's row
    assert missing[-1].row.overrides == {"peft_type": "LORA", "missing_image_ratio": 0.5}
    with pytest.raises(ValueError, match="--table"):
        table_entries("5", "LORA")
    with pytest.raises(ValueError, match="--peft"):
        table_entries("2", "LORA,,IA3")


# --- running, with a fake training function --------------------------------------------------------------------------


def fake_value(model: str, config: dict) -> float:
    seed = config["seed"]
    value = BASE[model] + 0.01 * len(config.get("modalities") or [])
    return value + 0.002 * (seed % 5) + 0.001 * (model == "PerPEFT") * (seed % 2)


@pytest.fixture
def fake_run(tmp_path, monkeypatch):
    fake = FakeRun(tmp_path, fake_value, GROUPED, topk=(20, 30), ndcg_offset=0.02,
                   stage1_name=lambda model, seed, n_calls: f"stage1-{n_calls}.pth")  # fmt: skip
    install(monkeypatch, fake, cmp, runner)
    # WithoutMM, soft_groups and missing_image_ratio come from other work: not needed to test the tables here.
    monkeypatch.setattr(runner, "check_row_configs", lambda *args: None)
    return fake


def dataset_keys(tmp_path, name="repds", with_images=True) -> dict:
    return make_atomic_dataset(tmp_path / "data", name, with_images=with_images)


def calls_by_label(fake, seed):
    return {Path(c["result_file"]).name.removesuffix(f"-seed{seed}.json"): c for c in fake.calls
            if c["config"]["seed"] == seed}  # fmt: skip


def test_table2_runs_every_row_once_with_equal_training_and_writes_json_markdown_png(tmp_path, fake_run, capsys):
    keys = dataset_keys(tmp_path)
    out = tmp_path / "t2"
    payload = reproduce("2", "repds", peft="LORA,IA3", seeds=2, result_dir=out, overrides={**keys, "seed": "7"})
    assert len(fake_run.calls) == 14 * 2  # w/o MM and FrozenMM once, not once per PEFT
    by_label = calls_by_label(fake_run, 7)
    for label in ("w-o-MM", "FrozenMM", "GlobalPEFT-LORA", "UserLevel2-IA3"):
        assert by_label[label]["config"]["epochs"] == 30  # 10 + 20: the resolved stage1/stage2 epochs
    for label in ("GroupLevel1-LORA", "PerPEFT-IA3"):
        assert "epochs" not in by_label[label]["config"]  # two-stage rows train their stages
    assert by_label["GlobalPEFT-IA3"]["config"]["peft_type"] == "IA3"
    # One stage 1 per (seed, PEFT type): GroupLevel1 trains it, GroupLevel2 and PerPEFT take it.
    for peft in ("LORA", "IA3"):
        first = by_label[f"GroupLevel1-{peft}"]
        assert "global_checkpoint" not in first["config"]
        stage1 = str(tmp_path / f"stage1-{fake_run.calls.index(first) + 1}.pth")
        assert by_label[f"GroupLevel2-{peft}"]["config"]["global_checkpoint"] == stage1
        assert by_label[f"PerPEFT-{peft}"]["config"]["global_checkpoint"] == stage1
    out_text = capsys.readouterr().out
    assert "run 1 of 28: w/o MM seed 7" in out_text and "run 28 of 28: PerPEFT IA3 seed 8" in out_text

    written = json.loads((out / "table2.json").read_text())
    assert written == json.loads(json.dumps(payload))
    assert written["seeds"] == [7, 8] and written["equal_training"]["single_stage_epochs"] == 30
    assert [b["title"] for b in written["blocks"]] == ["LORA", "IA3"]
    lora = written["blocks"][0]["summary"]
    assert lora["models"][:2] == ["w/o MM", "FrozenMM"] and lora["ttest"]["reference"] == "PerPEFT"
    assert lora["results"]["w/o MM"]["hit@20"]["per_seed"] == pytest.approx([0.10 + 0.004, 0.10 + 0.006])
    assert written["rows"]["PerPEFT LORA"]["runs"]["8"] == str(out / "runs" / "PerPEFT-LORA-seed8.json")
    assert written["rows"]["FrozenMM"]["results"]["hit@30"]["mean"] == pytest.approx(0.255)

    markdown = (out / "table2.md").read_text()
    assert markdown.count("| Model | hit@20 | hit@30 | ndcg@20 | ndcg@30 |") == 4  # results and p-values per block
    assert "## LORA" in markdown and "## IA3" in markdown and "30 epochs" in markdown
    perpeft_row = next(line for line in markdown.splitlines() if line.startswith("| PerPEFT | **"))
    assert perpeft_row.startswith("| PerPEFT | **30.55** (0.07) |")  # x100, best in bold, mean (std)
    assert "| GlobalPEFT | 20.50 (0.14)† |" in markdown  # constant gap to PerPEFT over seeds: p < 0.05
    assert markdown.strip() in out_text  # printed too
    png = out / "table2.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(png).size[0] > 500


def test_rerun_reuses_every_run(tmp_path, fake_run, capsys):
    keys = dataset_keys(tmp_path)
    first = reproduce("3", "repds", peft="LORA", seeds=1, result_dir=tmp_path / "t3", overrides=keys)
    n = len(fake_run.calls)
    assert n == 7  # PerPEFT runs once for both blocks
    capsys.readouterr()
    second = reproduce("3", "repds", peft="LORA", seeds=1, result_dir=tmp_path / "t3", overrides=keys)
    assert len(fake_run.calls) == n and second["blocks"] == first["blocks"]
    out = capsys.readouterr().out
    assert out.count("reusing") == 7 and "warning" not in out


def test_rows_runs_a_part_of_the_table_and_the_whole_table_reuses_it(tmp_path, fake_run, capsys):
    keys, out = dataset_keys(tmp_path), tmp_path / "t2"
    part = reproduce("2", "repds", peft="LORA", seeds=1, result_dir=out, overrides=keys,
                     only="w/o MM, GlobalPEFT,PerPEFT")  # fmt: skip
    assert [c["model"] for c in fake_run.calls] == ["WithoutMM", "GlobalPEFT", "PerPEFT"]
    assert list(part["blocks"][0]["rows"]) == ["w/o MM", "GlobalPEFT", "PerPEFT"]
    capsys.readouterr()
    reproduce("2", "repds", peft="LORA", seeds=1, result_dir=out, overrides=keys)
    assert len(fake_run.calls) == 8  # the five rows not yet run
    assert capsys.readouterr().out.count("reusing") == 3
    # GroupLevel1 and GroupLevel2 come before PerPEFT in the table, yet take the stage 1 its finished run trained.
    stage1 = str(tmp_path / "stage1-3.pth")
    later = {c["model"]: c["config"] for c in fake_run.calls[3:]}
    assert later["GroupLevel1"]["global_checkpoint"] == later["GroupLevel2"]["global_checkpoint"] == stage1
    # A --rows call without PerPEFT still takes the stage 1 of PerPEFT's finished run (of the same seed).
    reproduce("2", "repds", peft="LORA", seeds=[2025], result_dir=out, overrides=keys, only="PerPEFT")
    reproduce("2", "repds", peft="LORA", seeds=[2025], result_dir=out, overrides=keys, only="GroupLevel1")
    assert fake_run.calls[-1]["model"] == "GroupLevel1"
    assert fake_run.calls[-1]["config"]["global_checkpoint"] == str(tmp_path / "stage1-9.pth")
    # Another seed's run file in this seed's place is no finished run of it: its stage 1 is not taken.
    runs = out / "runs"
    (runs / "PerPEFT-LORA-seed2026.json").write_text((runs / "PerPEFT-LORA-seed2025.json").read_text())
    reproduce("2", "repds", peft="LORA", seeds=[2026], result_dir=out, overrides=keys, only="GroupLevel1")
    assert "global_checkpoint" not in fake_run.calls[-1]["config"]  # it trains its own
    with pytest.raises(ValueError, match="'PerPEFTT' is not a row of this table; its rows are w/o MM, FrozenMM"):
        reproduce("2", "repds", peft="LORA", seeds=1, result_dir=out, overrides=keys, only="PerPEFTT")


def test_stage1_is_shared_only_among_rows_with_the_same_stage1_settings(tmp_path, fake_run):
    reproduce("3", "repds", peft="LORA", seeds=1, result_dir=tmp_path / "t3", overrides=dataset_keys(tmp_path))
    by_label = calls_by_label(fake_run, 2024)
    stage1 = {label: c["config"].get("global_checkpoint") for label, c in by_label.items() if c["model"] in GROUPED}
    trained = [label for label, checkpoint in stage1.items() if checkpoint is None]
    # Each modality change trains its own stage 1; the stage-2 ablations share the first plain PerPEFT row's.
    assert trained == ["w-o-text-LORA", "w-o-image-LORA", "w-o-group-negatives-LORA"]
    shared = str(tmp_path / f"stage1-{fake_run.calls.index(by_label['w-o-group-negatives-LORA']) + 1}.pth")
    for label in ("random-grouping-LORA", "PerPEFT-LORA", "soft-groups-2-LORA"):
        assert stage1[label] == shared
    assert by_label["LargeGlobalPEFT-LORA"]["config"]["epochs"] == 30


def test_epochs_given_by_the_user_or_the_stage_keys(tmp_path, fake_run):
    keys = dataset_keys(tmp_path)
    entries = [Entry("b", "GlobalPEFT", Row("G", "GlobalPEFT", {})), Entry("b", "PerPEFT", Row("P", "PerPEFT", {}))]
    reproduce("3", "repds", seeds=1, result_dir=tmp_path / "a", entries=entries,
              overrides={**keys, "stage1_epochs": "2", "stage2_epochs": 3})  # fmt: skip
    assert fake_run.calls[0]["config"]["epochs"] == 5 and "epochs" not in fake_run.calls[1]["config"]
    payload = reproduce("3", "repds", seeds=1, result_dir=tmp_path / "b", entries=entries,
                        overrides={**keys, "epochs": "4"})  # fmt: skip
    assert fake_run.calls[2]["config"]["epochs"] == "4" and payload["equal_training"]["single_stage_epochs"] is None
    assert "Single-stage models 4 epochs (--epochs)" in Path(payload["files"]["markdown"]).read_text()
    with pytest.raises(ValueError, match="--peft=LORA"):
        reproduce("3", "repds", seeds=1, result_dir=tmp_path / "c", overrides={**keys, "peft_type": "IA3"})


def test_a_bad_row_fails_before_anything_trains(tmp_path, monkeypatch):
    from recbole_perpeft import quick_start

    monkeypatch.setattr(quick_start, "run", lambda *a, **k: pytest.fail("nothing may train"))
    entries = [Entry("b", "GlobalPEFT", Row("G", "GlobalPEFT", {})),
               Entry("b", "PerPEFT", Row("P typo", "PerPEFT", {"n_grops": 4}))]  # fmt: skip
    with pytest.raises(ValueError, match=r"row 'P typo' .*n_grops.*n_groups"):
        reproduce("3", "repds", seeds=1, result_dir=tmp_path / "x", entries=entries, overrides=dataset_keys(tmp_path))


@pytest.mark.parametrize("text_only", ["no image files", "modalities"])
def test_text_only_dataset_skips_the_modality_rows_with_a_reason(tmp_path, fake_run, capsys, text_only):
    keys = dataset_keys(tmp_path, "textds", with_images=text_only == "modalities")
    if text_only == "modalities":
        keys["modalities"] = ["text"]
    payload = reproduce("3", "textds", peft="LORA", seeds=1, result_dir=tmp_path / "t3", overrides=keys)
    out = capsys.readouterr().out
    reason = "no item images" if text_only == "no image files" else "text-only (its config sets modalities"
    assert re.search(rf"skipping w/o text LORA: .*{re.escape(reason)}", out)
    assert re.search(rf"skipping w/o image LORA: .*{re.escape(reason)}", out)
    assert len(fake_run.calls) == 5 and "run 5 of 5" in out
    assert set(payload["skipped"]) == {"w/o text LORA", "w/o image LORA"}
    assert "w/o text" not in payload["blocks"][0]["summary"]["models"]
    markdown = Path(payload["files"]["markdown"]).read_text()
    assert "Skipped rows:" in markdown and f"- w/o text LORA: {payload['skipped']['w/o text LORA']}" in markdown
    with pytest.raises(ValueError, match="every row was skipped"):
        reproduce("missing", "textds", peft="LORA", seeds=1, result_dir=tmp_path / "m", overrides=keys)


def test_missing_table_and_line_chart(tmp_path, fake_run):
    payload = reproduce("missing", "repds", peft="IA3", seeds=2, result_dir=tmp_path / "m",
                        overrides=dataset_keys(tmp_path))  # fmt: skip
    ratios = [c["config"].get("missing_image_ratio") for c in fake_run.calls if c["config"]["seed"] == 2024]
    assert ratios == [None, None, 0.25, 0.25, 0.5, 0.5]
    assert payload["metric"] == "hit@30"  # the config's valid_metric
    assert [b["title"] for b in payload["blocks"]] == ["0% of images removed", "25% of images removed",
                                                       "50% of images removed"]  # fmt: skip
    markdown = Path(payload["files"]["markdown"]).read_text()
    assert "| Model | 0% | 25% | 50% |" in markdown  # hit@30 x100, mean (std) of 0.408 and 0.401
    assert "| PerPEFT | 40.45 (0.49) | 40.45 (0.49) | 40.45 (0.49) |" in markdown
    png = Path(payload["files"]["chart"])
    assert png.name == "missing.png" and png.read_bytes()[:4] == b"\x89PNG"


def test_paper_numbers_beside_ours(tmp_path, fake_run):
    entries = [Entry("LORA", "GlobalPEFT", Row("G", "GlobalPEFT", {})), Entry("LORA", "PerPEFT", Row("P", "PerPEFT"))]
    paper = {"source": "https://arxiv.org/html/2602.09445", "tables": {"3": "Table 3"}, "datasets": {"repds": "Rep"},
             "values": {"3": {"repds": {"LORA": {"PerPEFT": {"hit@20": "12.34"}}}}}}  # fmt: skip
    payload = reproduce("3", "repds", seeds=1, result_dir=tmp_path / "p", entries=entries, paper=paper,
                        overrides=dataset_keys(tmp_path))  # fmt: skip
    markdown = Path(payload["files"]["markdown"]).read_text()
    assert "| Model | hit@20 | hit@20 (paper) | hit@30 | ndcg@20 | ndcg@30 |" in markdown
    assert re.search(r"\| GlobalPEFT \| [^|]+ \|  \| ", markdown)  # no paper number: a blank cell
    assert re.search(r"\| PerPEFT \| [^|]+ \| 12.34 \| ", markdown)
    assert '"(paper)" columns: Table 3 of https://arxiv.org/html/2602.09445, Rep' in markdown
    assert payload["blocks"][0]["paper"] == {"PerPEFT": {"hit@20": "12.34"}}


def test_table4_runs_lattice_bm3_on_their_own_schedule_beside_perpeft_ia3(tmp_path, fake_run):
    entries = table_entries("4")  # (IA)3 unless --peft says otherwise, as in the paper
    assert [(e.block, e.name, e.row) for e in entries] == [
        ("IA3", "LATTICE", Row("LATTICE", "LATTICE", {})), ("IA3", "BM3", Row("BM3", "BM3", {})),
        ("IA3", "PerPEFT", Row("PerPEFT IA3", "PerPEFT", {"peft_type": "IA3"}))]  # fmt: skip
    assert table_entries("4", "LORA")[-1].row.overrides == {"peft_type": "LORA"}
    paper = {"source": "https://arxiv.org/html/2602.09445", "tables": {"4": "Table 4"}, "datasets": {"repds": "Rep"},
             "values": {"4": {"repds": {"IA3": {"LATTICE": {"hit@20": "4.69"}}}}}}  # fmt: skip
    payload = reproduce("4", "repds", seeds=1, result_dir=tmp_path / "t4", paper=paper,
                        overrides={**dataset_keys(tmp_path), "stage1_epochs": 2, "stage2_epochs": 3})  # fmt: skip
    configs = {c["model"]: c["config"] for c in fake_run.calls}
    assert "epochs" not in configs["LATTICE"] and "epochs" not in configs["BM3"]  # their YAML's early stopping
    assert configs["PerPEFT"]["peft_type"] == "IA3" and Path(payload["files"]["markdown"]).name == "table4.md"
    markdown = Path(payload["files"]["markdown"]).read_text()
    assert re.search(r"\| LATTICE \| [^|]+ \| 4.69 \| ", markdown) and "| BM3 |" in markdown
    shipped = load_paper()
    assert shipped["values"]["4"]["amazon-sports"]["IA3"]["BM3"] == {"hit@20": "4.61", "ndcg@20": "1.94"}
    assert shipped["values"]["4"]["amazon-arts"]["IA3"]["PerPEFT"] == {"hit@20": "6.56", "ndcg@20": "2.67"}


def test_the_shipped_paper_file_loads_and_names_its_source():
    paper = load_paper()
    assert paper["source"] == "https://arxiv.org/html/2602.09445"
    assert set(paper["datasets"]) == {"amazon-arts", "amazon-beauty", "amazon-sports", "amazon-toys"}
    for datasets in paper["values"].values():
        assert set(datasets) <= set(paper["datasets"])


def test_the_shipped_paper_file_has_every_row_of_tables_2_and_3():
    """Filled from the paper: each of the paper's datasets has every row our Table 2 block prints (per PEFT type)
    and Table 3's LoRA rows, with the four metrics, so the "(paper)" columns appear."""
    paper = load_paper()
    for dataset in paper["datasets"]:
        for peft in ("LORA", "IA3", "IISAN"):
            names = {entry.name for entry in table_entries("2", [peft]) if entry.block == peft}
            rows = paper_rows(paper, "2", dataset, peft)
            assert set(rows) == names, (dataset, peft)
            assert all(set(metrics) == {"hit@20", "hit@30", "ndcg@20", "ndcg@30"} for metrics in rows.values())
        names = {entry.name for entry in table_entries("3", ["LORA"]) if entry.block == "LORA"}
        assert set(paper_rows(paper, "3", dataset, "LORA")) == names, dataset
    assert paper_rows(paper, "2", "amazon-sports", "LORA")["PerPEFT"]["hit@20"] == "4.82 (.04)"
    assert paper_note(paper, "2", "amazon-sports", shown=True).startswith('"(paper)" columns: Table 2 of')


def test_the_shipped_paper_file_matches_the_shared_copy():
    shared = Path(__file__).resolve().parents[2] / "shared" / "paper" / "paper_tables.yaml"
    if not shared.is_file():
        pytest.skip(f"no {shared}: the paper's numbers as copied for this project are not on this machine")
    copy = yaml.safe_load(shared.read_text(encoding="utf-8"))
    paper = load_paper(extra=())  # the shipped file alone (Table 4 comes from paper_table4.yaml, not the shared copy)
    assert paper["values"] == copy["values"]
    assert set(load_paper()["values"]) == set(copy["values"]) | {"4"}
    assert paper["dataset_statistics"] == copy["dataset_statistics"]


def test_command_line(monkeypatch, capsys):
    from recbole_perpeft.reproduce import runner as runner_module

    calls = []
    monkeypatch.setattr(runner_module, "reproduce", lambda *a, **k: calls.append((a, k)))
    reproduce_main(["--table=3", "--dataset=D", "--peft=IISAN", "--seeds=1,2", "--epochs=3", "--topk=[5, 10]",
                    "--config_files=a.yaml,b.yaml", "--rows=w/o MM,PerPEFT"])  # fmt: skip
    assert calls == [(("3", "D"), {"peft": "IISAN", "seeds": [1, 2], "result_dir": None,
                                   "config_file_list": ["a.yaml", "b.yaml"], "only": "w/o MM,PerPEFT",
                                   "overrides": {"epochs": "3", "topk": [5, 10]}, "extend": False,
                                   "jobs": "1"})]  # fmt: skip
    reproduce_main(["--table=2", "--dataset=D", "--stage2_epochs=27", "--extend"])
    assert calls[-1][1]["extend"] is True and calls[-1][1]["overrides"] == {"stage2_epochs": "27"}
    assert calls[-1][1]["peft"] is None  # the table's default PEFT types (tables.default_peft)
    reproduce_main(["--table=2", "--dataset=D", "--jobs=3"])
    assert calls[-1][1]["jobs"] == "3" and calls[-1][1]["overrides"] == {}

    def failing(*args, **kwargs):
        raise ValueError("--peft_type: a table sets ...")

    monkeypatch.setattr(runner_module, "reproduce", failing)
    with pytest.raises(SystemExit) as info:
        reproduce_main(["--table=2", "--dataset=D", "--peft_type=IA3"])
    assert str(info.value.code).startswith("error: --peft_type")
    with pytest.raises(SystemExit):
        reproduce_main(["--table=5", "--dataset=D"])
    assert "invalid choice" in capsys.readouterr().err


# --- end to end: real tiny runs --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_rows_end_to_end(tmp_path, monkeypatch, capsys):
    """GlobalPEFT and three two-stage rows on a tiny dataset with a tiny CLIP, stages of 1 epoch: GlobalPEFT
    trains 2, GroupLevel1 reuses PerPEFT's stage 1, w/o text trains its own; a rerun trains nothing."""
    monkeypatch.chdir(tmp_path)  # RecBole writes log/ and log_tensorboard/ in the working directory
    keys = table_keys(tmp_path, "e2eds")
    entries = [Entry("LORA", "GlobalPEFT", Row("GlobalPEFT", "GlobalPEFT", {})),
               Entry("LORA", "PerPEFT", Row("PerPEFT", "PerPEFT", {})),
               Entry("LORA", "GroupLevel1", Row("GroupLevel1", "GroupLevel1", {})),
               Entry("LORA", "w/o text", Row("w/o text", "PerPEFT", {"modalities": ["image"]}),
                     needs_images=True)]  # fmt: skip
    payload = reproduce("3", "e2eds", seeds=1, result_dir=tmp_path / "out", entries=entries, overrides=keys)
    runs = {label: json.loads(Path(row["runs"]["2024"]).read_text()) for label, row in payload["rows"].items()}
    assert runs["GlobalPEFT"]["config"]["epochs"] == 2  # stage1_epochs + stage2_epochs
    assert runs["GroupLevel1"]["global_checkpoint"] == runs["PerPEFT"]["global_checkpoint"]
    assert runs["w/o text"]["global_checkpoint"] != runs["PerPEFT"]["global_checkpoint"]
    assert runs["w/o text"]["config"]["modalities"] == ["image"]
    assert payload["blocks"][0]["summary"]["models"] == [e.name for e in entries]
    assert Path(payload["files"]["chart"]).stat().st_size > 0
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "runs").iterdir()}
    checkpoints = sorted(p.name for p in (tmp_path / "saved").iterdir())
    capsys.readouterr()

    again = reproduce("3", "e2eds", seeds=1, result_dir=tmp_path / "out", entries=entries, overrides=keys)
    assert capsys.readouterr().out.count("reusing") == 4
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "runs").iterdir()} == files
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == checkpoints  # nothing trained
    assert again["blocks"] == payload["blocks"]
