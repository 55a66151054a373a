"""Resume that reproduces (recbole_perpeft/resume.py): a real run, killed mid-training (SIGKILL, or
Ctrl-C = SIGINT) and resumed with --resume, ends with exactly the uninterrupted run's
best_valid_result and test_result. GlobalPEFT and PerPEFT (killed in stage 1 and in stage 2), with a
peft family (LoRA) and a side network (IISAN), on a tiny CLIP."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest
import torch
import yaml

from recbole_perpeft.resume import best_checkpoint_path, load_checkpoint
from tests.tiny import finish, interrupt_after, make_atomic_dataset, make_tiny_clip, quick_config, start

DATASET = "resume"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    clip = make_tiny_clip(root / "clip")
    data = make_atomic_dataset(root / "data", DATASET, n_users=40, n_items=25)
    keys = quick_config(root, **data, foundation_model="clip", clip_path=clip.path, topk=[5, 10],
                        valid_metric="hit@10", learning_rate=1e-3, n_groups=2,
                        peft_config={"lora_dropout": 0.2})  # fmt: skip
    for key in ("epochs", "checkpoint_dir"):  # per run, on the command line
        keys.pop(key)
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(keys))
    return path


CASES = {
    # name: (model args, -last file to watch, epoch after which to interrupt, signal)
    "GlobalPEFT-LORA-SIGKILL": (["--model=GlobalPEFT", "--peft_type=LORA", "--epochs=5"],
                                "GlobalPEFT-*-last.pth", 1, signal.SIGKILL),
    "GlobalPEFT-IISAN-SIGINT": (["--model=GlobalPEFT", "--peft_type=IISAN", "--epochs=6"],
                                "GlobalPEFT-*-last.pth", 2, signal.SIGINT),
    "PerPEFT-LORA-stage2-SIGKILL": (["--model=PerPEFT", "--peft_type=LORA", "--stage1_epochs=2", "--stage2_epochs=4"],
                                    "PerPEFT-*[0-9]-last.pth", 1, signal.SIGKILL),
    "PerPEFT-IISAN-stage1-SIGINT": (["--model=PerPEFT", "--peft_type=IISAN", "--stage1_epochs=5",
                                     "--stage2_epochs=2"], "PerPEFT-*-stage1-GlobalPEFT-last.pth", 1, signal.SIGINT),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_killed_and_resumed_run_ends_with_the_uninterrupted_result(case, config_file, tmp_path):
    model_args, pattern, epoch, sig = CASES[case]
    common = [*model_args, f"--dataset={DATASET}", f"--config_files={config_file}"]

    plain = finish(start([*common, f"--checkpoint_dir={tmp_path / 'plain'}",
                          f"--result_file={tmp_path / 'plain.json'}"], tmp_path, tmp_path / "plain.log"))  # fmt: skip
    assert plain.returncode == 0, plain.stdout[-4000:]

    first_dir = tmp_path / "killed"
    args = [*common, f"--checkpoint_dir={first_dir}", f"--result_file={tmp_path / 'resumed.json'}"]
    proc = start(args, tmp_path, tmp_path / "killed.log", hold=(pattern, epoch))  # waits there for the signal
    interrupt_after(proc, first_dir, pattern, epoch, sig)
    killed = finish(proc)
    assert not (tmp_path / "resumed.json").exists()
    if sig == signal.SIGINT:
        # Ctrl-C: exit status 130 and one line (no traceback) saying how to resume.
        assert killed.returncode == 130, killed.stdout[-4000:]
        assert "Traceback" not in killed.stdout
        line = killed.stdout.strip().splitlines()[-1]
        resume_file = re.search(r"--resume=(\S+)$", line).group(1)
        assert line.startswith("interrupted: resume with") and resume_file.endswith("-last.pth")
    else:
        assert killed.returncode == -signal.SIGKILL
        # The best checkpoint, as a user finds it in the log ("Saving current: ..."); its -last file is used.
        resume_file = best_checkpoint_path(str(next(first_dir.glob(pattern))))
    resumed = finish(start([*args, f"--resume={resume_file}"], tmp_path, tmp_path / "resumed.log"))
    assert resumed.returncode == 0, resumed.stdout[-4000:]

    expected = json.loads((tmp_path / "plain.json").read_text())
    got = json.loads((tmp_path / "resumed.json").read_text())
    assert got["best_valid_result"] is not None and got["test_result"]
    assert got["best_valid_result"] == expected["best_valid_result"]  # exactly: same floats
    assert got["test_result"] == expected["test_result"]
    assert got["best_valid_score"] == expected["best_valid_score"]
    assert got.get("groups") == expected.get("groups")
    seconds = got["seconds"]  # complete: every epoch of the run, before and after the kill
    for key, value in expected["seconds"].items():
        if isinstance(value, list):
            assert len(seconds[key]) == len(value), key


def test_truncated_checkpoint_is_one_clear_error(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "epoch": 0}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError, match=r"cut\.pth cannot be read .*truncated, corrupt"):
        load_checkpoint(str(path))
