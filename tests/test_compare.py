"""recbole_perpeft.compare: seeds, the runner (with a fake training function: stage-1 sharing, per-run JSON
reuse), the command line, and one real comparison end to end (the statistics: test_compare_report.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from recbole_perpeft import compare as cmp
from tests.fake_runs import FakeRun, install
from tests.tiny import REPO_ROOT, RUN_SCRIPT, load_entry_point, make_atomic_dataset, quick_config

# --- seeds -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [("3", 3), (3, 3), ("1", 1), ("1,2,3", [1, 2, 3]), (" 7 , 9 ", [7, 9]), ("5,", [5]), ([4, 2], [4, 2])],
)
def test_parse_seeds(value, expected):
    assert cmp.parse_seeds(value) == expected


@pytest.mark.parametrize("value", ["0", "-2", "three", "1,x", "1,2,1", ",", True])
def test_parse_seeds_rejects_bad_values(value):
    with pytest.raises(ValueError, match="seed"):
        cmp.parse_seeds(value)


def test_a_seed_typed_as_a_count_is_refused_with_the_list_form():
    # --seeds=2025 once started 5 x 2025 runs of a table; the error names the one-seed spellings.
    with pytest.raises(ValueError, match=r"--seeds=2025,"):
        cmp.parse_seeds("2025")
    assert cmp.parse_seeds("2025,") == [2025]
    assert cmp.parse_seeds(str(cmp.MAX_SEED_COUNT)) == cmp.MAX_SEED_COUNT


def test_resolve_seeds_counts_up_from_the_base_seed_or_keeps_a_list():
    assert cmp.resolve_seeds(3, 2024) == [2024, 2025, 2026]
    assert cmp.resolve_seeds("2", lambda: 10) == [10, 11]

    def no_config():
        raise AssertionError("an explicit list needs no base seed")

    assert cmp.resolve_seeds("8,3", no_config) == [8, 3]


def test_config_seed_from_override_files_or_properties(tmp_path):
    assert cmp.config_seed("SASRec", "anything", None, {"seed": "11"}) == 11
    keys = make_atomic_dataset(tmp_path / "data", "seedds", with_images=False)
    keys.pop("image_dir")
    assert cmp.config_seed("SASRec", "seedds", None, keys) == 2024  # recbole_perpeft/properties/overall.yaml
    config_file = tmp_path / "seed.yaml"
    config_file.write_text("seed: 99\n")
    assert cmp.config_seed("SASRec", "seedds", [str(config_file)], keys) == 99


def test_output_paths_sit_next_to_the_result_file(tmp_path):
    assert cmp.output_paths(tmp_path / "out" / "table.json") == (tmp_path / "out/table.runs", tmp_path / "out/table.md")
    assert cmp.output_paths("table") == (Path("table.runs"), Path("table.md"))
    assert cmp.run_file("x.runs", "PerPEFT", 7) == Path("x.runs/PerPEFT-seed7.json")
    with pytest.raises(ValueError, match="Markdown"):
        cmp.output_paths("table.md")


def test_parse_models():
    assert cmp.parse_models("SASRec, FrozenMM,PerPEFT") == ["SASRec", "FrozenMM", "PerPEFT"]
    for bad in ("A,,B", "A,B,A", ","):
        with pytest.raises(ValueError):
            cmp.parse_models(bad)


def test_two_stage_models_are_found_by_their_load_global():
    assert cmp.is_grouped("PerPEFT")
    assert not cmp.is_grouped("GlobalPEFT") and not cmp.is_grouped("SASRec")
    with pytest.raises(ValueError, match="NoSuchModel"):
        cmp.is_grouped("NoSuchModel")


# --- the runner, with a fake training function ----------------------------------------------------------------------

GROUPED = {"PerPEFT", "GroupLevel1"}


def fake_value(model: str, config: dict) -> float:
    return {"SASRec": 0.1, "GlobalPEFT": 0.2, "PerPEFT": 0.3, "GroupLevel1": 0.25}[model] + 0.01 * (config["seed"] % 7)


@pytest.fixture
def fake_run(tmp_path, monkeypatch):
    return install(monkeypatch, FakeRun(tmp_path, fake_value, GROUPED), cmp)


def test_compare_shares_stage1_per_seed_and_writes_json_and_markdown(tmp_path, fake_run, capsys):
    result_file = tmp_path / "out" / "table.json"
    models = ["SASRec", "PerPEFT", "GlobalPEFT", "GroupLevel1"]
    summary = cmp.compare(
        ",".join(models), "ds", seeds=2, overrides={"seed": "40", "epochs": "1"}, result_file=result_file
    )
    calls = fake_run.calls
    assert [(c["model"], c["config"]["seed"]) for c in calls] == [(m, s) for s in (40, 41) for m in models]
    assert all(c["config"]["epochs"] == "1" for c in calls)  # overrides go to every run
    for seed in (40, 41):
        by_model = {c["model"]: c["config"] for c in calls if c["config"]["seed"] == seed}
        assert "global_checkpoint" not in by_model["PerPEFT"]  # the first grouped model trains stage 1
        assert by_model["GroupLevel1"]["global_checkpoint"] == str(tmp_path / f"stage1-PerPEFT-{seed}.pth")
        assert "global_checkpoint" not in by_model["SASRec"] and "global_checkpoint" not in by_model["GlobalPEFT"]
    runs_dir = tmp_path / "out" / "table.runs"
    assert [c["result_file"] for c in calls[:2]] == [str(runs_dir / "SASRec-seed40.json"),
                                                     str(runs_dir / "PerPEFT-seed40.json")]  # fmt: skip

    written = json.loads(result_file.read_text())
    assert written == json.loads(json.dumps(summary))
    assert written["dataset"] == "ds" and written["seeds"] == [40, 41] and written["models"] == models
    assert written["metrics"] == ["hit@5", "hit@10", "ndcg@5", "ndcg@10"]
    assert written["runs"]["PerPEFT"] == {"40": str(runs_dir / "PerPEFT-seed40.json"),
                                          "41": str(runs_dir / "PerPEFT-seed41.json")}  # fmt: skip
    per_run = json.loads((runs_dir / "PerPEFT-seed41.json").read_text())
    assert per_run["config"]["seed"] == 41 and per_run["test_result"]["hit@5"] == pytest.approx(0.3 + 0.06)
    sas = written["results"]["SASRec"]["hit@5"]
    assert sas["per_seed"] == pytest.approx([0.15, 0.16]) and sas["mean"] == pytest.approx(0.155)
    assert sas["std"] == pytest.approx(np.std([0.15, 0.16], ddof=1))
    assert written["ttest"]["reference"] == "GroupLevel1" and set(written["ttest"]["p_values"]) == set(models[:3])

    markdown = (tmp_path / "out" / "table.md").read_text()
    assert "| PerPEFT | **35.50** (0.71)† |" in markdown  # hit@5: best mean, x100; differs from GroupLevel1
    out = capsys.readouterr().out
    assert markdown.strip() in out  # printed too
    assert "run 1 of 8: SASRec seed 40" in out and "run 8 of 8: GroupLevel1 seed 41" in out


def test_compare_reuses_finished_runs(tmp_path, fake_run, capsys):
    result_file = tmp_path / "t.json"
    first = cmp.compare(["SASRec", "PerPEFT", "GroupLevel1"], "ds", seeds=[3, 4], result_file=result_file)
    assert len(fake_run.calls) == 6
    capsys.readouterr()

    second = cmp.compare(["SASRec", "PerPEFT", "GroupLevel1"], "ds", seeds=[3, 4], result_file=result_file)
    assert len(fake_run.calls) == 6  # nothing ran again
    assert second == first
    out = capsys.readouterr().out
    assert out.count("reusing") == 6 and "run 2 of 6: PerPEFT seed 3: reusing" in out

    # A new seed and a lost run: only those run; GroupLevel1 still gets the reused PerPEFT's stage 1.
    os.remove(tmp_path / "t.runs" / "GroupLevel1-seed3.json")
    cmp.compare(["SASRec", "PerPEFT", "GroupLevel1"], "ds", seeds=[3, 4, 5], result_file=result_file)
    redone = [(c["model"], c["config"]["seed"]) for c in fake_run.calls[6:]]
    assert redone == [("GroupLevel1", 3), ("SASRec", 5), ("PerPEFT", 5), ("GroupLevel1", 5)]
    assert fake_run.calls[6]["config"]["global_checkpoint"] == str(tmp_path / "stage1-PerPEFT-3.pth")

    # A per-run JSON of another run (here seed 4's) in the way, or a broken one, is not taken for this run.
    runs_dir = tmp_path / "t.runs"
    (runs_dir / "SASRec-seed3.json").write_text((runs_dir / "SASRec-seed4.json").read_text())
    cmp.compare(["SASRec"], "ds", seeds=[3], result_file=result_file)
    assert len(fake_run.calls) == 11 and fake_run.calls[-1]["config"]["seed"] == 3
    assert json.loads((runs_dir / "SASRec-seed3.json").read_text())["config"]["seed"] == 3
    (runs_dir / "SASRec-seed3.json").write_text("{not json")
    cmp.compare(["SASRec"], "ds", seeds=[3], result_file=result_file)
    assert len(fake_run.calls) == 12
    assert "not a finished run of SASRec" in capsys.readouterr().out

    # Reused runs whose config disagrees with an override are reported (and still not redone).
    cmp.compare(["SASRec"], "ds", seeds=[3], overrides={"epochs": "3"}, result_file=result_file)
    assert len(fake_run.calls) == 12
    assert "SASRec-seed3.json was run with epochs=None (now 3)" in capsys.readouterr().out


def test_changed_keys_compares_overrides_as_recbole_reads_them():
    result = {"config": {"epochs": 1, "topk": [5, 10], "show_progress": False, "valid_metric": "hit@10",
                         "learning_rate": 0.001, "checkpoint_dir": "/x/saved", "seed": 1}}  # fmt: skip
    same = {"epochs": "1", "topk": "[5,10]", "show_progress": "false", "valid_metric": "hit@10",
            "learning_rate": "1e-3", "checkpoint_dir": "/x/saved", "seed": "2"}  # fmt: skip
    assert cmp.changed_keys(result, same) == []
    assert cmp.changed_keys(result, {"epochs": "2", "topk": "[5]"}) == ["epochs=1 (now 2)", "topk=[5, 10] (now [5])"]


def test_compare_keeps_a_global_checkpoint_the_user_gave(tmp_path, fake_run):
    cmp.compare("PerPEFT,GroupLevel1", "ds", seeds="1,2", overrides={"global_checkpoint": "mine.pth"},
                result_file=tmp_path / "t.json")  # fmt: skip
    assert [c["config"]["global_checkpoint"] for c in fake_run.calls] == ["mine.pth"] * 4


def test_compare_checks_names_and_reference_before_training(tmp_path, fake_run):
    with pytest.raises(ValueError, match="--ttest=Nope"):
        cmp.compare("SASRec,PerPEFT", "ds", seeds=1, result_file=tmp_path / "t.json", reference="Nope")
    assert not fake_run.calls


def test_parse_runs_from():
    assert cmp.parse_runs_from(None) == {}
    assert cmp.parse_runs_from("SASRec=a/b.runs, w/o MM = d/runs/w-o-MM,SASRec=c") == {
        "SASRec": [Path("a/b.runs"), Path("c")], "w/o MM": [Path("d/runs/w-o-MM")]}  # fmt: skip
    assert cmp.parse_runs_from({"A": "x", "B": ["y", "z"]}) == {"A": [Path("x")], "B": [Path("y"), Path("z")]}
    for bad, fragment in [("SASRec", "NAME=PATH"), ("=x", "both"), ("A=", "both")]:
        with pytest.raises(ValueError, match=fragment):
            cmp.parse_runs_from(bad)


def test_compare_reads_rows_from_finished_runs_elsewhere(tmp_path, fake_run, capsys):
    # Finished runs in two places: another comparison's runs folder, and a reproduce table's row "w/o MM"
    # (PerPEFT runs under another label): read where they are, not copied, not trained.
    cmp.compare("SASRec,PerPEFT", "ds", seeds=[3, 4], result_file=tmp_path / "old" / "t.json")
    other = tmp_path / "repro" / "runs"
    cmp.run_rows([cmp.Row("w/o MM", "PerPEFT", {"n_groups": 2})], "ds", [3, 4], other)
    assert len(fake_run.calls) == 6
    capsys.readouterr()

    summary = cmp.compare(
        "SASRec,GlobalPEFT,PerPEFT-2", "ds", seeds="3,4", result_file=tmp_path / "new.json",
        runs_from=f"SASRec={tmp_path / 'old' / 't.runs'},PerPEFT-2={other / 'w-o-MM'}")  # fmt: skip
    assert [(c["model"], c["config"]["seed"]) for c in fake_run.calls[6:]] == [("GlobalPEFT", 3), ("GlobalPEFT", 4)]
    assert summary["models"] == ["SASRec", "GlobalPEFT", "PerPEFT-2"]
    assert summary["runs"]["PerPEFT-2"] == {"3": str(other / "w-o-MM-seed3.json"),
                                            "4": str(other / "w-o-MM-seed4.json")}  # fmt: skip
    assert summary["results"]["SASRec"]["hit@5"]["per_seed"] == pytest.approx([0.13, 0.14])
    assert summary["results"]["PerPEFT-2"]["hit@5"]["per_seed"] == pytest.approx([0.33, 0.34])
    assert summary["ttest"]["reference"] == "PerPEFT-2"
    assert not (tmp_path / "new.runs" / "SASRec-seed3.json").exists()
    assert "PerPEFT-2 (PerPEFT): 2 runs from" in capsys.readouterr().out

    # A seed missing from a source, a source of another dataset, or a name not in --model: an error naming
    # the file, before anything trains.
    n = len(fake_run.calls)
    with pytest.raises(FileNotFoundError, match=r"SASRec-seed5.json: no such file"):
        cmp.compare("GlobalPEFT,SASRec", "ds", seeds=[3, 5], result_file=tmp_path / "x.json",
                    runs_from={"SASRec": tmp_path / "old" / "t.runs"})  # fmt: skip
    # ... unless another place of that row holds it: seeds run into two folders make one row.
    cmp.compare("SASRec", "ds", seeds=[5], result_file=tmp_path / "later" / "t.json")
    both = cmp.compare("SASRec", "ds", seeds=[3, 5], result_file=tmp_path / "x.json",
                       runs_from=f"SASRec={tmp_path / 'old' / 't.runs'},SASRec={tmp_path / 'later' / 't.runs'}")
    assert both["runs"]["SASRec"] == {"3": str(tmp_path / "old" / "t.runs" / "SASRec-seed3.json"),
                                      "5": str(tmp_path / "later" / "t.runs" / "SASRec-seed5.json")}  # fmt: skip
    n = len(fake_run.calls)
    with pytest.raises(FileNotFoundError, match="not a finished run on other"):
        cmp.compare("SASRec", "other", seeds=[3], result_file=tmp_path / "x.json",
                    runs_from={"SASRec": tmp_path / "old" / "t.runs"})  # fmt: skip
    with pytest.raises(ValueError, match="not in --model"):
        cmp.compare("SASRec", "ds", seeds=[3], result_file=tmp_path / "x.json", runs_from={"Nope": tmp_path})
    assert len(fake_run.calls) == n


def test_runs_from_labels_alone_need_the_seeds_as_a_list(tmp_path, fake_run, monkeypatch):
    def known_only(model):
        if model not in {"SASRec", "PerPEFT", "GroupLevel1", "GlobalPEFT"}:
            raise ValueError(f"unknown model {model}")
        return model in GROUPED

    monkeypatch.setattr(cmp, "is_grouped", known_only)
    cmp.compare("SASRec", "ds", seeds=[3], result_file=tmp_path / "r.json")
    old = f"Old={tmp_path / 'r.runs' / 'SASRec'}"
    with pytest.raises(ValueError, match="give the seeds as a list"):  # no model to read the config's seed of
        cmp.compare("Old", "ds", seeds=1, result_file=tmp_path / "x.json", runs_from=old)
    summary = cmp.compare("Old", "ds", seeds=[3], result_file=tmp_path / "x.json", runs_from=old)
    assert summary["results"]["Old"]["hit@5"]["per_seed"] == pytest.approx([0.13])


def test_runs_from_rows_of_mixed_models_are_refused(tmp_path, fake_run):
    runs = tmp_path / "r.runs"
    cmp.compare("SASRec,PerPEFT", "ds", seeds=[3, 4], result_file=tmp_path / "r.json")
    (runs / "SASRec-seed4.json").write_text((runs / "PerPEFT-seed4.json").read_text())
    with pytest.raises(ValueError, match="several models"):
        cmp.compare("SASRec", "ds", seeds=[3, 4], result_file=tmp_path / "x.json", runs_from=f"SASRec={runs}")


def test_row_labels_become_safe_distinct_file_names(tmp_path):
    assert cmp.safe_name("w/o group negatives") == "w-o-group-negatives"
    assert cmp.safe_name("GlobalPEFT LORA missing0.25") == "GlobalPEFT-LORA-missing0.25"
    assert cmp.run_file("r", "soft groups (k=2)", 3) == Path("r/soft-groups-k=2-seed3.json")
    with pytest.raises(ValueError, match="file name"):
        cmp.safe_name("//")
    with pytest.raises(ValueError, match="distinct labels"):
        cmp.check_rows([("w/o text", "PerPEFT", {}), ("w-o text", "PerPEFT", {})])


def test_stage1_key_ignores_stage2_keys_seed_and_epochs_only():
    base = cmp.stage1_key({"peft_type": "LORA", "learning_rate": "1e-3"})
    stage2_only = {"group_negatives": False, "grouping_method": "random", "n_groups": "4", "soft_groups": 2,
                   "stage2_epochs": 5, "weight_decay_grid": [0, 0.1], "seed": 3, "epochs": 30}  # fmt: skip
    assert base == cmp.stage1_key({"learning_rate": 0.001, "peft_type": "LORA", **stage2_only})
    assert base != cmp.stage1_key({"peft_type": "LORA", "learning_rate": "1e-3", "modalities": ["image"]})
    assert base != cmp.stage1_key({"peft_type": "IA3", "learning_rate": "1e-3"})
    assert base != cmp.stage1_key({"peft_type": "LORA", "learning_rate": "1e-3", "stage1_epochs": 2})


def test_run_rows_runs_labelled_rows_and_shares_stage1_by_settings(tmp_path, fake_run, capsys):
    rows = [cmp.Row("w/o text", "PerPEFT", {"modalities": ["image"]}),
            cmp.Row("w/o group negatives", "PerPEFT", {"group_negatives": False}),
            cmp.Row("SASRec", "SASRec", {"epochs": 30}),
            cmp.Row("GroupLevel1", "GroupLevel1", {"n_groups": 4}),
            cmp.Row("PerPEFT", "PerPEFT")]  # fmt: skip
    runs, results = cmp.run_rows(rows, "ds", [5], tmp_path / "runs", overrides={"learning_rate": "1e-3"}, log="t")
    calls = {Path(c["result_file"]).name: c["config"] for c in fake_run.calls}
    assert list(calls) == ["w-o-text-seed5.json", "w-o-group-negatives-seed5.json", "SASRec-seed5.json",
                           "GroupLevel1-seed5.json", "PerPEFT-seed5.json"]  # fmt: skip
    assert calls["w-o-text-seed5.json"] == {"learning_rate": "1e-3", "modalities": ["image"], "seed": 5}
    assert calls["SASRec-seed5.json"]["epochs"] == 30 and "global_checkpoint" not in calls["SASRec-seed5.json"]
    # w/o text trains its own stage 1 (other modalities); the stage-2 variants share the first plain one's.
    assert "global_checkpoint" not in calls["w-o-group-negatives-seed5.json"]
    first_plain = str(tmp_path / "stage1-PerPEFT-5.pth")  # FakeRun names stage 1 by model and seed
    assert calls["GroupLevel1-seed5.json"]["global_checkpoint"] == first_plain
    assert calls["PerPEFT-seed5.json"]["global_checkpoint"] == first_plain
    assert runs["w/o text"] == {5: str(tmp_path / "runs" / "w-o-text-seed5.json")}
    assert results["PerPEFT"][5]["hit@5"] == pytest.approx(0.3 + 0.05)
    assert "[t] run 1 of 5: w/o text seed 5" in capsys.readouterr().out

    skipped = cmp.run_rows(rows[:3], "ds", [5], tmp_path / "runs", overrides={"learning_rate": "1e-3"}, log="t",
                           skip=lambda row: "no images" if row.label == "w/o text" else None)  # fmt: skip
    assert set(skipped[0]) == {"w/o group negatives", "SASRec"} and len(fake_run.calls) == 5  # the rest reused
    out = capsys.readouterr().out
    assert "[t] skipping w/o text: no images" in out and "run 2 of 2: SASRec seed 5: reusing" in out


# --- command line ------------------------------------------------------------------------------------------------


@pytest.fixture
def entry_calls(monkeypatch):
    from recbole_perpeft import quick_start

    calls = []
    monkeypatch.setattr(quick_start, "run", lambda *a, **k: calls.append(("run", a, k)))
    monkeypatch.setattr(cmp, "compare", lambda *a, **k: calls.append(("compare", a, k)))
    return calls


def test_command_line_picks_single_run_or_comparison(entry_calls):
    main = load_entry_point().main
    main(["--model=A", "--dataset=D", "--seed=7", "--epochs=1", "--result_file=r.json"])
    assert entry_calls[-1] == (
        "run",
        ("A", "D"),
        {"config_file_list": None, "config_dict": {"seed": "7", "epochs": "1"}, "result_file": "r.json",
         "resume": None},
    )  # fmt: skip

    main(["--model=A,B", "--dataset=D", "--seeds=2", "--epochs=1", "--config_files=x.yaml", "--result_file=t.json"])
    kind, args, kwargs = entry_calls[-1]
    assert kind == "compare" and args == ("A,B", "D")
    assert kwargs == {"seeds": 2, "config_file_list": ["x.yaml"], "overrides": {"epochs": "1"},
                      "result_file": "t.json", "reference": None, "runs_from": None, "extend": False,
                      "jobs": "1"}  # fmt: skip

    main(["--model=A", "--dataset=D", "--jobs=2"])  # --jobs alone: a comparison of one model (its runs at once)
    assert entry_calls[-1][0] == "compare" and entry_calls[-1][2]["jobs"] == "2"

    main(["--model=A", "--dataset=D", "--seeds=1,5"])  # --seeds alone: a comparison of one model
    assert entry_calls[-1][0] == "compare" and entry_calls[-1][2]["seeds"] == [1, 5]
    main(["--model=A,B", "--ttest=A"])  # a comma alone: one seed
    assert entry_calls[-1][0] == "compare" and entry_calls[-1][2]["seeds"] == cmp.DEFAULT_SEEDS == 1
    assert entry_calls[-1][2]["reference"] == "A"
    main(["--model=A", "--runs_from=A=old.runs"])  # --runs_from alone: a comparison too
    assert entry_calls[-1][0] == "compare" and entry_calls[-1][2]["runs_from"] == "A=old.runs"
    main(["--model=A", "--extend", "--epochs=20"])  # --extend alone: a comparison too (continuing its runs)
    assert entry_calls[-1][0] == "compare" and entry_calls[-1][2]["extend"] is True
    assert len(entry_calls) == 7


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--model=A,B", "--seeds=x"], "--seeds"),
        (["--model=A,B", "--resume=c.pth"], "--resume"),
    ],
)
def test_command_line_comparison_errors(argv, fragment, entry_calls):
    with pytest.raises(SystemExit) as info:
        load_entry_point().main(argv)
    assert str(info.value.code).startswith("error: ") and fragment in str(info.value.code)
    assert not entry_calls


def test_command_line_comparison_error_from_compare(monkeypatch):
    def failing(*args, **kwargs):
        raise FileNotFoundError("no such dataset")

    monkeypatch.setattr(cmp, "compare", failing)
    with pytest.raises(SystemExit) as info:
        load_entry_point().main(["--model=A,B"])
    assert info.value.code == "error: no such dataset"


# --- end to end ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_comparison_end_to_end(tmp_path):
    data_keys = make_atomic_dataset(tmp_path / "data", "cmpds", n_users=30, n_items=40)
    keys = quick_config(tmp_path, **data_keys, topk=[5, 10], valid_metric="hit@10", state="WARNING")
    keys.pop("epochs")
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(keys))
    result_file = tmp_path / "table.json"
    argv = [sys.executable, str(RUN_SCRIPT), "--model=SASRec,FrozenMM", "--dataset=cmpds", "--seeds=2",
            "--epochs=1", f"--config_files={config_file}", f"--result_file={result_file}"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]

    summary = json.loads(result_file.read_text())
    assert summary["dataset"] == "cmpds" and summary["models"] == ["SASRec", "FrozenMM"]
    assert summary["seeds"] == [2024, 2025]
    assert summary["metrics"] == ["hit@5", "hit@10", "ndcg@5", "ndcg@10"]
    checkpoints = set()
    for model in ("SASRec", "FrozenMM"):
        for seed in (2024, 2025):
            run = json.loads(Path(summary["runs"][model][str(seed)]).read_text())
            assert run["model"] == model and run["config"]["seed"] == seed and run["config"]["epochs"] == 1
            checkpoints.add(run["checkpoint"])
        for metric in summary["metrics"]:
            entry = summary["results"][model][metric]
            assert len(entry["per_seed"]) == 2 and all(0 <= v <= 1 for v in entry["per_seed"])
            assert entry["mean"] == pytest.approx(np.mean(entry["per_seed"]))
            assert entry["std"] == pytest.approx(np.std(entry["per_seed"], ddof=1))
    assert len(checkpoints) == 4  # one checkpoint file per run
    assert summary["ttest"]["reference"] == "FrozenMM" and set(summary["ttest"]["p_values"]) == {"SASRec"}

    markdown = (tmp_path / "table.md").read_text()
    assert "| Model | hit@5 | hit@10 | ndcg@5 | ndcg@10 |" in markdown and "**" in markdown
    assert "| SASRec |" in markdown and "| FrozenMM |" in markdown
    assert markdown.strip() in proc.stdout
    assert "run 4 of 4: FrozenMM seed 2025" in proc.stdout

    # Run again: every run is reused, nothing trains, the table is the same.
    mtimes = {p: p.stat().st_mtime for p in (tmp_path / "table.runs").iterdir()}
    again = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stdout.count("reusing") == 4
    assert {p: p.stat().st_mtime for p in (tmp_path / "table.runs").iterdir()} == mtimes
    assert (tmp_path / "table.md").read_text() == markdown


@pytest.mark.parametrize("jobs, extend, message", [("0", False, "at least 1"), ("two", False, "a number of runs"),
                                                    (2, True, "--extend continues finished runs one at a time")])
def test_bad_jobs_are_refused_before_anything_runs(jobs, extend, message):
    with pytest.raises(ValueError, match=message):
        cmp.check_jobs(jobs, extend)
