"""LATTICE and BM3 as a user runs them (tiny CLIP, tiny data): a comparison over seeds, two processes on gloo
ending where one process ends, and a killed run resumed with --resume ending with the uninterrupted result."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
import yaml

from recbole_perpeft.resume import best_checkpoint_path
from tests.tiny import finish, interrupt_after, make_atomic_dataset, make_tiny_clip, quick_config, run_script, start

DATASET = "genruns"
MODELS = ("LATTICE", "BM3")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("genruns")
    clip = make_tiny_clip(root / "clip")
    data = make_atomic_dataset(root / "data", DATASET, n_users=40, n_items=25)
    keys = quick_config(root, **data, foundation_model="clip", clip_path=clip.path, topk=[5, 10],
                        valid_metric="hit@10", learning_rate=5e-3, state="WARNING",
                        train_batch_size=64)  # the models' own (1024, 2048) would be one batch an epoch  # fmt: skip
    for key in ("epochs", "checkpoint_dir"):  # per run
        keys.pop(key)
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(keys))
    return root, path


def test_compare_runs_both_over_seeds(env, tmp_path):
    root, config_file = env
    result = tmp_path / "table.json"
    proc = run_script([f"--model={','.join(MODELS)}", f"--dataset={DATASET}", "--seeds=2", "--epochs=2",
                       f"--config_files={config_file}", f"--result_file={result}",
                       f"--checkpoint_dir={tmp_path / 'saved'}"], cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = json.loads(result.read_text())
    assert summary["models"] == list(MODELS) and summary["seeds"] == [2024, 2025]
    for model in MODELS:
        for seed in ("2024", "2025"):
            run = json.loads(Path(summary["runs"][model][seed]).read_text())
            assert run["model"] == model and run["config"]["epochs"] == 2 and run["config"]["repeatable"] is False
            assert run["seconds"]["train"] > 0 and len(run["seconds"]["per_epoch"]) == 2
        entry = summary["results"][model]["hit@10"]
        assert len(entry["per_seed"]) == 2 and all(0 <= v <= 1 for v in entry["per_seed"])
    assert "| LATTICE |" in (tmp_path / "table.md").read_text()


def one_run(env, model: str, checkpoint_dir: Path, nproc: int, **keys) -> dict:
    from recbole_perpeft.quick_start import run

    root, config_file = env
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        keys = {"checkpoint_dir": str(checkpoint_dir), "nproc": nproc, "epochs": 3, **keys}
        return run(model, DATASET, config_file_list=[str(config_file)], config_dict=keys)


# Each process draws its own dropout masks (distributed.py): BM3's target views are compared without dropout.
@pytest.mark.parametrize(("model", "keys"), [("LATTICE", {}), ("BM3", {"dropout": 0.0})])
def test_two_processes_train_as_one(env, model, keys, tmp_path):
    one, two = (one_run(env, model, tmp_path / f"p{n}", n, **keys) for n in (1, 2))
    assert two["config"]["world_size"] == 2 and two["config"]["single_spec"] is False
    a, b = (torch.load(r["checkpoint"], weights_only=True) for r in (one, two))
    assert a["epoch"] == b["epoch"] and a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=1e-4, atol=2e-5, msg=key)
    for key in ("best_valid_result", "test_result"):  # up to float noise in the weights (a tie: 1 user of 40)
        assert all(one[key][k] == pytest.approx(two[key][k], abs=0.026) for k in one[key]), (one[key], two[key])


@pytest.mark.parametrize(("model", "sig"), [("LATTICE", signal.SIGKILL), ("BM3", signal.SIGINT)])
def test_killed_and_resumed_run_ends_with_the_uninterrupted_result(env, model, sig, tmp_path):
    root, config_file = env
    common = [f"--model={model}", f"--dataset={DATASET}", f"--config_files={config_file}", "--epochs=4"]
    plain_args = [*common, f"--checkpoint_dir={tmp_path / 'plain'}", f"--result_file={tmp_path / 'plain.json'}"]
    plain = finish(start(plain_args, tmp_path, tmp_path / "plain.log"))
    assert plain.returncode == 0, plain.stdout[-4000:]
    killed_dir, pattern = tmp_path / "killed", f"{model}-*-last.pth"
    args = [*common, f"--checkpoint_dir={killed_dir}", f"--result_file={tmp_path / 'resumed.json'}"]
    proc = start(args, tmp_path, tmp_path / "killed.log", hold=(pattern, 1))
    interrupt_after(proc, killed_dir, pattern, 1, sig)
    assert finish(proc).returncode in (-signal.SIGKILL, 130)
    resume_file = best_checkpoint_path(str(next(killed_dir.glob(pattern))))
    resumed = finish(start([*args, f"--resume={resume_file}"], tmp_path, tmp_path / "resumed.log"))
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    expected, got = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("plain", "resumed"))
    for key in ("best_valid_result", "test_result", "best_valid_score"):
        assert got[key] == expected[key], key  # exactly: the same floats
