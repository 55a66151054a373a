"""Training in several processes (recbole_perpeft/distributed.py, launch.py), gloo on the CPU, tiny CLIP.

Two processes with the same global batch end where one process ends: PerPEFT's stage 1 (a GlobalPEFT
run) and stage 2, weights up to float noise and the same metrics; gradients are reduced only where some
rank has them; a two-process run killed with SIGKILL takes its processes with it and resumes, on two
processes with the uninterrupted result and on one with it up to float noise."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from recbole.data.interaction import Interaction

from recbole_perpeft import distributed
from recbole_perpeft.launch import launch_settings
from recbole_perpeft.resume import best_checkpoint_path
from tests.tiny import finish, interrupt_after, make_atomic_dataset, make_tiny_clip, quick_config, start

DATASET = "ddp"
pytestmark = pytest.mark.slow
STAGE2_EPOCHS = 3


# --- launch settings, batch shares (no process group) ----------------------------------------------------------


def test_launch_settings_read_the_config_files_and_the_command_line(tmp_path):
    assert not launch_settings(None, {}).spawns
    one_machine = launch_settings(None, {"nproc": "2"})  # as the command line gives it
    assert (one_machine.nproc, one_machine.world_size, one_machine.offset) == (2, 2, 0) and one_machine.spawns
    assert one_machine.port > 0  # a free port: nothing else on this machine needs to know it
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump({"nproc": 2, "world_size": 4, "ip": "10.0.0.1", "port": 29500}))
    second = launch_settings([str(path)], {"offset": "2"})
    assert (second.nproc, second.world_size, second.ip, second.port, second.offset) == (2, 4, "10.0.0.1", 29500, 2)
    with pytest.raises(ValueError, match=r"world_size=4 is too small for offset=3 \+ nproc=2"):
        launch_settings([str(path)], {"offset": 3})
    with pytest.raises(ValueError, match=r"nproc must be an integer of at least 1, got 'two'"):
        launch_settings(None, {"nproc": "two"})


def test_batch_shares_cover_each_row_once_and_weigh_the_loss(monkeypatch):
    assert [distributed.shard_bounds(5, 2, r) for r in range(2)] == [(0, 3), (3, 5)]
    assert [distributed.shard_bounds(1, 3, r) for r in range(3)] == [(0, 1), (1, 1), (1, 1)]
    targets = torch.tensor([[2, 3, 0], [4, 0, 0], [5, 6, 7]])  # 2, 1 and 3 positions with a target
    batch = Interaction({"user_id": torch.arange(3), "target_item_list": targets, "shared_neg_items": torch.ones(1, 4)})
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    shares = []
    for r in range(2):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        part, share = distributed.shard_batch(batch, model=None)
        shares.append(share)
        assert part["user_id"].tolist() == [[0, 1], [2]][r]
        assert part["shared_neg_items"].shape == (1, 4)  # one row for the whole batch: every rank gets it
    assert shares == [3 / 6, 3 / 6]  # positions, not rows (2/3, 1/3): the global loss is a mean over positions


# --- two real processes ------------------------------------------------------------------------------------------


def _gradient_ranks(local_rank: int, port: int) -> None:
    """Rank 0 uses parameters a and b, rank 1 only b; c is used by nobody (a group adapter of no batch)."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://localhost:{port}", rank=local_rank, world_size=2)
    a, b, c = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    loss = (b * (local_rank + 1)).sum() + (a.sum() if local_rank == 0 else 0)
    loss.backward()
    stop, total = distributed.reduce_gradients([a, b, c], [float(local_rank == 1), 0.5])
    assert (stop, total) == (1.0, 1.0)
    assert a.grad.tolist() == [1.0] * 3 and b.grad.tolist() == [3.0] * 3 and c.grad is None
    assert distributed.on_rank0(lambda: torch.distributed.get_rank()) == 0
    torch.distributed.destroy_process_group()


def test_gradients_are_summed_where_any_rank_has_them():
    torch.multiprocessing.spawn(_gradient_ranks, args=(launch_settings(None, {"nproc": 2}).port,), nprocs=2)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    clip = make_tiny_clip(root / "clip")
    data = make_atomic_dataset(root / "data", DATASET, n_users=40, n_items=25)
    # No dropout: each process draws its own masks (see distributed.py), the only difference left.
    keys = quick_config(root, **data, foundation_model="clip", clip_path=clip.path, topk=[5, 10],
                        valid_metric="hit@10", learning_rate=1e-3, n_groups=2, stage1_epochs=1,
                        stage2_epochs=STAGE2_EPOCHS, hidden_dropout_prob=0.0, attn_dropout_prob=0.0,
                        projector_dropout=0.0, train_batch_size=7)  # fmt: skip
    for key in ("epochs", "checkpoint_dir"):
        keys.pop(key)
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(keys))
    return root, path


def perpeft_run(env, checkpoint_dir: Path, nproc: int, resume: str | None = None) -> dict:
    """``run`` in this process (one process) or from it (two); RecBole's logs go under the env's root."""
    from recbole_perpeft.quick_start import run  # (here: the processes of the gradient test import this file)

    root, config_file = env
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        return run("PerPEFT", DATASET, config_file_list=[str(config_file)], resume=resume,
                   config_dict={"checkpoint_dir": str(checkpoint_dir), "nproc": nproc})  # fmt: skip


@pytest.fixture(scope="module")
def runs(env):
    return {n: perpeft_run(env, env[0] / f"p{n}", n) for n in (1, 2)}


def trained(path: str) -> dict:
    return torch.load(path, weights_only=True)


def assert_same_training(one: dict, two: dict) -> None:
    assert one["epoch"] == two["epoch"] and one["best_valid_score"] == pytest.approx(two["best_valid_score"], abs=0.03)
    assert one["state_dict"].keys() == two["state_dict"].keys()
    for key, value in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][key], value, rtol=1e-4, atol=2e-5, msg=key)


def assert_same_metrics(one: dict, two: dict) -> None:
    # Up to float noise in the weights; a tie broken otherwise moves one user of 40 (0.025).
    assert one.keys() == two.keys()
    assert all(one[k] == pytest.approx(two[k], abs=0.026) for k in one), (one, two)


def test_two_processes_train_globalpeft_as_one(runs):
    """Stage 1 is a GlobalPEFT run: its best checkpoint, from either run."""
    one, two = (trained(runs[n]["global_checkpoint"]) for n in (1, 2))
    assert len(two["rank_rng_states"]) == 2 and "rank_rng_states" not in one
    assert_same_training(one, two)
    assert_same_metrics(one["best_valid_result"], two["best_valid_result"])


def test_two_processes_train_perpeft_as_one(runs):
    one, two = runs[1], runs[2]
    assert one["groups"] == two["groups"]  # rank 0 grouped the users for both
    assert_same_training(trained(one["checkpoint"]), trained(two["checkpoint"]))
    for key in ("best_valid_result", "test_result"):
        assert_same_metrics(one[key], two[key])
    assert two["config"]["world_size"] == 2 and two["config"]["single_spec"] is False
    # One set of files per run (stage 1 and 2, their -last, the groups), whatever the number of processes.
    files = [sorted(p.name[-20:] for p in Path(r["checkpoint"]).parent.iterdir()) for r in (one, two)]
    assert len(files[0]) == 5 and len(files[1]) == 5


def test_killed_two_process_run_resumes_on_any_number_of_processes(env, runs, tmp_path):
    root, config_file = env
    killed_dir = tmp_path / "killed"
    args = ["--model=PerPEFT", f"--dataset={DATASET}", f"--config_files={config_file}", "--nproc=2",
            f"--checkpoint_dir={killed_dir}"]  # fmt: skip
    hold = ("PerPEFT-*[0-9]-last.pth", 0)  # the run pauses where it is killed (in stage 2's epoch 1): no race
    proc = start(args, tmp_path, tmp_path / "killed.log", hold=hold)
    ranks = []
    while len(ranks) < 2 and proc.poll() is None:  # the spawned processes (not the spawn's resource tracker)
        ranks = [c for c in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]
        time.sleep(0.1)
    interrupt_after(proc, killed_dir, *hold, signal.SIGKILL)
    assert finish(proc).returncode == -signal.SIGKILL
    gone, alive = psutil.wait_procs(ranks, timeout=30)
    assert not alive, "training processes outlived the killed launcher"
    resume_file = best_checkpoint_path(str(next(killed_dir.glob("PerPEFT-*[0-9]-last.pth"))))
    shutil.copytree(killed_dir, tmp_path / "copy")

    # (The user would add --resume to the command above; run() is what it calls, without a second launcher.)
    got, expected = perpeft_run(env, killed_dir, 2, resume=resume_file), runs[2]
    for key in ("best_valid_result", "test_result", "best_valid_score", "groups"):
        assert got[key] == expected[key], key  # exactly: the same processes' states were restored

    # The same checkpoint on one process: the uninterrupted result up to float noise (no dropout here).
    one = perpeft_run(env, tmp_path / "copy", 1, resume=str(tmp_path / "copy" / Path(resume_file).name))
    for key in ("best_valid_result", "test_result"):
        assert_same_metrics(one[key], expected[key])
    assert_same_training(trained(one["checkpoint"]), trained(expected["checkpoint"]))
