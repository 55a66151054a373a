"""--extend (recbole_perpeft/extend_runs.py): which finished runs can be continued to a longer schedule, and, end to
end on tiny real runs, that a table continued from 1 + 1 to 1 + 2 epochs gives the runs of 1 + 2 from scratch
while the shorter runs' files stay as they were."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from recbole_perpeft import compare as cmp
from recbole_perpeft.compare import Row, changed_values
from recbole_perpeft.extend_runs import extension
from recbole_perpeft.reproduce import Entry, reproduce
from tests.fake_runs import FakeRun, install
from tests.tiny import table_keys


def finished(tmp_path, grouped: bool, **config) -> dict:
    """A finished run's result with its checkpoint files present."""
    checkpoint = tmp_path / "saved" / "run.pth"
    checkpoint.parent.mkdir(exist_ok=True)
    for name in ("run.pth", "run-last.pth", *(["run-groups.pt"] if grouped else [])):
        (tmp_path / "saved" / name).write_bytes(b"x")
    base = {"epochs": 10, "stage1_epochs": 3, "stage2_epochs": 7, "learning_rate": 1e-4}
    return {"config": {**base, **config}, "checkpoint": str(checkpoint), "test_result": {"hit@30": 0.1}}


def test_a_longer_schedule_is_an_extension_of_the_models_own_schedule_key(tmp_path):
    single, grouped = finished(tmp_path, False), finished(tmp_path, True)
    longer = {"epochs": 20, "stage1_epochs": 3, "stage2_epochs": 17}
    assert extension(single, changed_values(single, longer), grouped=False) == (10, 20)
    assert extension(grouped, changed_values(grouped, longer), grouped=True) == (7, 17)
    # The same length (only keys the model does not read differ): nothing to extend, plain reuse.
    assert extension(single, changed_values(single, {"stage2_epochs": 17}), grouped=False) is None
    assert extension(grouped, changed_values(grouped, {"epochs": 30}), grouped=True) is None


def test_data_path_as_recbole_resolves_it_is_no_change():
    result = {"dataset": "ds", "config": {"data_path": "/d/ds", "epochs": 10}}
    assert changed_values(result, {"data_path": "/d", "epochs": 10}) == {}
    assert changed_values(result, {"data_path": "/e"}) == {"data_path": ("/d/ds", "/e")}


def test_what_cannot_be_extended(tmp_path):
    single, grouped = finished(tmp_path, False), finished(tmp_path, True)
    # Another setting changed too: not this run at a longer schedule (reused with the warning, as before).
    assert extension(single, changed_values(single, {"epochs": 20, "learning_rate": 1e-3}), False) is None
    # A different stage 1 is a different run.
    assert extension(grouped, changed_values(grouped, {"stage1_epochs": 5, "stage2_epochs": 17}), True) is None
    # Reasons, for the error --extend gives:
    assert "more than the 5 asked" in extension(single, changed_values(single, {"epochs": 5}), False)
    tuned = {**grouped, "weight_decay_tuning": {"0.0": 0.2, "0.1": 0.3}}
    assert "weight_decay_grid" in extension(tuned, changed_values(tuned, {"stage2_epochs": 17}), True)
    (tmp_path / "saved" / "run-last.pth").unlink()
    assert "run-last.pth is gone" in extension(single, changed_values(single, {"epochs": 20}), False)


def test_extend_refuses_a_run_it_cannot_continue_naming_it_and_reuse_hints_at_it(tmp_path, monkeypatch, capsys):
    fake = install(monkeypatch, FakeRun(tmp_path, lambda model, config: 0.2, grouped=()), cmp)
    runs_dir = tmp_path / "runs"
    cmp.run_rows([Row("GlobalPEFT", "GlobalPEFT", {})], "ds", [1], runs_dir, overrides={"epochs": 10})
    capsys.readouterr()
    cmp.run_rows([Row("GlobalPEFT", "GlobalPEFT", {})], "ds", [1], runs_dir, overrides={"epochs": 20})
    assert "continue it to more epochs with --extend" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"GlobalPEFT-seed1.json cannot be continued.*no checkpoint"):
        cmp.run_rows([Row("GlobalPEFT", "GlobalPEFT", {})], "ds", [1], runs_dir, overrides={"epochs": 20},
                     extend=True)  # fmt: skip
    assert len(fake.calls) == 1  # nothing trained again


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_a_table_extended_from_1_plus_1_to_1_plus_2_equals_it_trained_from_scratch(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # RecBole writes log/ and log_tensorboard/ in the working directory
    keys = table_keys(tmp_path, "extds")
    entries = [Entry("LORA", "GlobalPEFT", Row("GlobalPEFT", "GlobalPEFT", {})),
               Entry("LORA", "PerPEFT", Row("PerPEFT", "PerPEFT", {}))]  # fmt: skip
    table = dict(table="3", dataset="extds", seeds=1, entries=entries)

    def runs(payload) -> dict:
        return {label: json.loads(Path(row["runs"]["2024"]).read_text()) for label, row in payload["rows"].items()}

    short = runs(reproduce(**table, result_dir=tmp_path / "ext", overrides=keys))
    files = {p: digest(p) for p in (tmp_path / "saved").iterdir()}
    capsys.readouterr()

    longer = {**keys, "stage2_epochs": 2}
    extended = runs(reproduce(**table, result_dir=tmp_path / "ext", overrides=longer, extend=True))
    out = capsys.readouterr().out
    assert "GlobalPEFT seed 2024: extending" in out and "(epochs 2 -> 3)" in out
    assert "PerPEFT seed 2024: extending" in out and "(stage2_epochs 1 -> 2)" in out
    assert all(digest(p) == h for p, h in files.items())  # the shorter runs' checkpoints untouched
    for label, kept in (("GlobalPEFT", "GlobalPEFT-seed2024.epochs2.json"),
                        ("PerPEFT", "PerPEFT-seed2024.stage2_epochs1.json")):  # fmt: skip
        assert json.loads((tmp_path / "ext" / "runs" / kept).read_text()) == short[label]
    assert not list((tmp_path / "ext" / "runs").glob("*.extending.json"))

    scratch = runs(reproduce(**table, result_dir=tmp_path / "scratch", overrides=longer))
    assert extended["GlobalPEFT"]["config"]["epochs"] == 3 and len(extended["GlobalPEFT"]["seconds"]["per_epoch"]) == 3
    assert extended["PerPEFT"]["config"]["stage2_epochs"] == 2
    for label in ("GlobalPEFT", "PerPEFT"):
        for key in ("best_valid_result", "test_result"):
            assert extended[label][key] == scratch[label][key], (label, key)

    capsys.readouterr()
    reproduce(**table, result_dir=tmp_path / "ext", overrides=longer, extend=True)
    assert capsys.readouterr().out.count("reusing") == 2  # extended once, then reused


def test_extend_checks_every_run_before_training_any(tmp_path, monkeypatch):
    # Seed 1 is new (it would train first), seeds 2 and 3 finished without checkpoints: the refusal comes before
    # seed 1 trains and names both, so a half-extended table never happens.
    fake = install(monkeypatch, FakeRun(tmp_path, lambda model, config: 0.2, grouped=()), cmp)
    runs_dir, row = tmp_path / "runs", Row("GlobalPEFT", "GlobalPEFT", {})
    cmp.run_rows([row], "ds", [2, 3], runs_dir, overrides={"epochs": 10})
    with pytest.raises(ValueError, match=r"nothing was trained.*seed2.json cannot.*seed3.json cannot") as refused:
        cmp.run_rows([row], "ds", [1, 2, 3], runs_dir, overrides={"epochs": 20}, extend=True)
    assert "seed1" not in str(refused.value)
    assert len(fake.calls) == 2  # the two first runs only
    assert not (runs_dir / "GlobalPEFT-seed1.json").exists()
