"""A user's mistake in a run's settings, or a fault around it, ends in one line naming the key / file / value
and what to do, before anything trains; a run prints little and logs the rest (issue 44, run side).

Each class of case is tested as a class: every declared numeric key against every kind of bad value, every
output folder, every shape key of a checkpoint, not only the instances the issue found."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from recbole_perpeft.checkpoint_match import SHAPE_KEYS, check_checkpoint_matches, data_fingerprint
from recbole_perpeft.config_values import NUMERIC_KEYS
from recbole_perpeft.launch import Launch, WorkerDied, launch, report_checkpoint
from recbole_perpeft.run_checks import check_sequence_length, check_writable_outputs
from tests.conftest import config_for
from tests.tiny import finish, load_entry_point, make_atomic_dataset, make_tiny_clip, quick_config, start

# --- numeric keys: declared type and range, checked when the Config is built ----------------------------------

NOT_NUMBERS = ["ten", "nan", float("nan"), float("inf"), True, [1], {"a": 1}]


@pytest.mark.parametrize("key", sorted(NUMERIC_KEYS))
def test_every_declared_numeric_key_refuses_every_kind_of_bad_value_by_name(key):
    spec = NUMERIC_KEYS[key]
    for bad in NOT_NUMBERS:
        with pytest.raises(ValueError, match=rf"^{key} must be (an?|a positive|a non-negative) (integer|number).*, "
                                             rf"got {re.escape(repr(bad))}"):  # fmt: skip
            spec.check(key, bad)
    outside = []
    if spec.low is not None:
        outside.append(spec.low if spec.open_low else spec.low - 1)
    if spec.high is not None:
        outside.append(spec.high + 1)
    if spec.kind is int:
        outside.append((spec.low or 0) + 1.5)  # not a whole number
    for bad in outside:
        with pytest.raises(ValueError, match=rf"^{key} must be"):
            spec.check(key, bad)
    inside = spec.high if spec.high is not None else (spec.low or 0) + 1
    assert spec.check(key, inside) == inside
    if spec.kind is int:
        assert type(spec.check(key, float(inside))) is int  # 1e3 on the command line is a float


# The issue's instances (as the command line gives them: strings RecBole converts) and keys only their default
# declares numeric (projector_hidden_size, multimodal_weight: not in NUMERIC_KEYS).
CONFIG_CASES = [
    ("learning_rate", "nan"), ("seed", "abc"), ("epochs", "ten"), ("epochs", "0"), ("epochs", "-1"),
    ("train_batch_size", "2.5"), ("hidden_dropout_prob", "1.5"), ("MAX_ITEM_LIST_LENGTH", "0"),
    ("projector_hidden_size", "big"), ("multimodal_weight", "nan"), ("topk", "[0]"), ("topk", "[5, 'x']"),
]  # fmt: skip


@pytest.mark.parametrize(("key", "value"), CONFIG_CASES)
def test_a_bad_number_is_refused_when_the_config_is_built(toy_dataset, base_config, key, value):
    with pytest.raises(ValueError, match=rf"^{key} must be"):
        config_for("GlobalPEFT", toy_dataset, base_config, **{key: value})


def test_good_numbers_pass_and_integral_floats_become_ints(toy_dataset, base_config):
    config = config_for("GlobalPEFT", toy_dataset, base_config, epochs="1e1", learning_rate="1e-3", seed="7")
    assert config["epochs"] == 10 and type(config["epochs"]) is int
    assert config["learning_rate"] == 1e-3 and config["seed"] == 7


# --- valid_metric among the computed metrics -----------------------------------------------------------------


@pytest.mark.parametrize(("valid_metric", "hint"), [("hit@50", "add 50 to topk"), ("recall@5", "add it to metrics"),
                                                     ("hit", "add it to metrics")])  # fmt: skip
def test_a_valid_metric_the_run_does_not_compute_is_refused_before_training(toy_dataset, base_config,
                                                                            valid_metric, hint):  # fmt: skip
    with pytest.raises(ValueError, match=rf"valid_metric '{valid_metric}' is not among .*hit@5, ndcg@5.*{hint}"):
        config_for("GlobalPEFT", toy_dataset, base_config, metrics=["Hit", "NDCG"], valid_metric=valid_metric)
    config = config_for("GlobalPEFT", toy_dataset, base_config, metrics=["Hit", "NDCG"], valid_metric="NDCG@5")
    assert config["valid_metric"] == "NDCG@5"


# --- a device asked for and absent -----------------------------------------------------------------------------


@pytest.mark.parametrize("asked", [{"device": "cuda"}, {"device": "cuda:1"}, {"gpu_id": "0"}, {"gpu_id": "0,1"}])
def test_a_gpu_asked_for_on_a_machine_without_one_is_refused(toy_dataset, base_config, monkeypatch, asked):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base = {k: v for k, v in base_config.items() if k not in ("device", "use_gpu")}
    with pytest.raises(ValueError, match=r"asks for a GPU, but torch sees no CUDA device.*--use_gpu=False"):
        config_for("GlobalPEFT", toy_dataset, base, **asked)
    assert config_for("GlobalPEFT", toy_dataset, base)["device"].type == "cpu"  # RecBole's default: quietly the CPU


def test_device_cpu_is_honoured_and_an_unknown_device_refused(toy_dataset, base_config, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # RecBole alone would pick CUDA
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    base = {k: v for k, v in base_config.items() if k not in ("device", "use_gpu")}
    assert config_for("GlobalPEFT", toy_dataset, base, device="cpu")["device"].type == "cpu"
    assert config_for("GlobalPEFT", toy_dataset, base, use_gpu=False)["device"].type == "cpu"
    with pytest.raises(ValueError, match=r"device must be cpu or cuda \(cuda:N\), got 'tpu'"):
        config_for("GlobalPEFT", toy_dataset, base, device="tpu")


# --- outputs checked writable up front -------------------------------------------------------------------------


@pytest.fixture
def tiny_run_file(tmp_path) -> Path:
    data = make_atomic_dataset(tmp_path / "data", "runa", n_users=30, n_items=25, with_images=False)
    clip = make_tiny_clip(tmp_path / "clip")
    keys = quick_config(tmp_path, **data, foundation_model="clip", clip_path=clip.path, topk=[5], valid_metric="hit@5")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(keys))
    return path


@pytest.mark.parametrize("case", ["checkpoint_dir", "cache_dir", "result_file is a folder", "result_file's folder"])
def test_an_output_that_cannot_be_written_is_refused_before_the_data_is_read(tmp_path, in_tmp_path, tiny_run_file,
                                                                            monkeypatch, case):  # fmt: skip
    from recbole_perpeft import quick_start

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    args = {"checkpoint_dir": f"--checkpoint_dir={blocker / 'saved'}", "cache_dir": f"--cache_dir={blocker}",
            "result_file is a folder": f"--result_file={tmp_path}",
            "result_file's folder": f"--result_file={blocker / 'r.json'}"}[case]  # fmt: skip
    monkeypatch.setattr(quick_start, "create_dataset", lambda config: pytest.fail("the data was read"))
    with pytest.raises(SystemExit) as stop:
        load_entry_point().main(["--model=GlobalPEFT", "--dataset=runa", f"--config_files={tiny_run_file}", args])
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert re.search(r"is a folder: give a file path|is not a writable folder", message), message
    assert case.split(" ")[0].split("'")[0] in message


def test_check_writable_outputs_creates_missing_folders(tmp_path):
    config = {"checkpoint_dir": str(tmp_path / "a" / "saved"), "cache_dir": str(tmp_path / "b")}
    check_writable_outputs(config, str(tmp_path / "c" / "r.json"), saved=True)
    assert (tmp_path / "a" / "saved").is_dir() and (tmp_path / "c").is_dir() and not list((tmp_path / "b").iterdir())


# --- MAX_ITEM_LIST_LENGTH against the data ----------------------------------------------------------------------


def test_a_sequence_length_beyond_the_data_is_refused_with_the_bound_before_allocating(toy_dataset, toy_config,
                                                                                       caplog):  # fmt: skip
    from recbole_perpeft.data import create_dataset

    config = toy_config("GlobalPEFT", toy_dataset, MAX_ITEM_LIST_LENGTH=100000)
    dataset = create_dataset(config)
    with pytest.raises(ValueError, match=r"MAX_ITEM_LIST_LENGTH=100000 would need about .* GiB .* free; the longest "
                                         r"history in \S+ is 12 interactions .*--MAX_ITEM_LIST_LENGTH=11 or lower"):
        check_sequence_length(config, dataset, available=2**28)
    check_sequence_length(config, dataset, available=2**50)  # it fits: one warning, no refusal
    assert "the positions beyond are only padding" in caplog.text
    caplog.clear()
    check_sequence_length(toy_config("GlobalPEFT", toy_dataset, MAX_ITEM_LIST_LENGTH=5), dataset, available=2**30)
    assert not caplog.text


# --- a checkpoint of other data or another shape --------------------------------------------------------------


def test_a_checkpoint_of_other_data_or_shape_is_refused_naming_both(toy_dataset, build_toy_dataset, toy_config):
    from recbole_perpeft.data import create_dataset

    config = toy_config("GlobalPEFT", toy_dataset)
    mine = data_fingerprint(create_dataset(config), config)
    assert mine == data_fingerprint(create_dataset(config), config)  # the same data: the same fingerprint
    sampled = toy_config("GlobalPEFT", toy_dataset, user_sample_ratio=0.5)
    others = {"another user sample": data_fingerprint(create_dataset(sampled), sampled),
              "another dataset": dict(mine, dataset="another")}  # fmt: skip
    for theirs in others.values():
        with pytest.raises(ValueError, match=r"--resume=x.pth was trained on .*; this run has .*user sample"):
            check_checkpoint_matches({"data_fingerprint": theirs}, "x.pth", "--resume", mine, config)
    check_checkpoint_matches({"data_fingerprint": mine}, "x.pth", "--resume", mine, config)
    check_checkpoint_matches({}, "old.pth", "--resume", mine, config)  # written before fingerprints: not compared
    for key in SHAPE_KEYS:
        saved = {"run_keys": {key: "something else"}}
        run = {key: "this run's"}
        with pytest.raises(ValueError, match=rf"trained with {key}=something else; this run has {key}=this run's\. "
                                             rf"Pass --{key}=something else"):
            check_checkpoint_matches(saved, "x.pth", "--resume", mine, run)


# --- a whole run, as a user starts it: quiet, and its checkpoints refused for other data -----------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny GlobalPEFT epoch on dataset runa, run as a user would (a subprocess)."""
    root = tmp_path_factory.mktemp("quiet")
    data = make_atomic_dataset(root / "data", "runa", n_users=30, n_items=25, with_images=False)
    make_atomic_dataset(root / "data", "runb", n_users=30, n_items=25, with_images=False, seed=3)  # same shapes
    clip = make_tiny_clip(root / "clip")
    keys = quick_config(root, **data, foundation_model="clip", clip_path=clip.path, topk=[5], valid_metric="hit@5",
                        show_progress=False)  # fmt: skip
    keys.pop("image_dir")
    config_file = root / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(keys))
    common = ["--model=GlobalPEFT", f"--config_files={config_file}"]
    done = finish(start([*common, "--dataset=runa", f"--result_file={root / 'r.json'}"], root, root / "run.log"))
    assert done.returncode == 0, done.stdout[-3000:]
    return root, common, done.stdout


def test_a_run_prints_progress_metrics_and_files_and_logs_the_rest(trained):
    root, _, printed = trained
    lines = printed.strip().splitlines()
    assert len(lines) <= 40, printed
    for noise in ("General Hyper Parameters", "Trainable parameters:", "GlobalPEFT(", "FutureWarning",
                  "Loading weights"):  # fmt: skip
        assert noise not in printed
    assert "test result" in printed and "Result written to" in printed
    log_file = re.search(r"files: checkpoint (\S+\.pth); log (\S+\.log)", printed).group(2)
    logged = Path(log_file if os.path.isabs(log_file) else root / log_file).read_text()
    assert "General Hyper Parameters" in logged and "GlobalPEFT(" in logged and "Trainable parameters:" in logged


def checkpoint_of(trained) -> str:
    root, _, printed = trained
    return re.search(r"files: checkpoint (\S+\.pth)", printed).group(1)


def test_the_checkpoint_records_its_data_and_shape(trained):
    saved = torch.load(checkpoint_of(trained), weights_only=True)
    assert saved["data_fingerprint"]["dataset"] == "runa" and saved["data_fingerprint"]["users"] == 30
    assert saved["run_keys"]["MAX_ITEM_LIST_LENGTH"] == "10"


@pytest.mark.parametrize(("args", "expected"), [
    (["--dataset=runb"], r"was trained on runa: 30 users, 25 items, ids \w+; this run has runb"),
    (["--dataset=runa", "--user_sample_ratio=0.5"], r"this run has runa, user_sample_ratio 0.5 \(seed 2024\)"),
    (["--dataset=runa", "--MAX_ITEM_LIST_LENGTH=5"], r"trained with MAX_ITEM_LIST_LENGTH=10; this run has "
                                                     r"MAX_ITEM_LIST_LENGTH=5\. Pass --MAX_ITEM_LIST_LENGTH=10"),
])  # fmt: skip
def test_resume_refuses_a_checkpoint_of_other_data_or_shape_in_one_line(trained, in_tmp_path, args, expected):
    root, common, _ = trained
    with pytest.raises(SystemExit) as stop:
        load_entry_point().main([*common, *args, f"--resume={checkpoint_of(trained)}"])
    message = str(stop.value.code)
    assert message.startswith("error: --resume=") and "\n" not in message and re.search(expected, message), message


def test_global_checkpoint_of_other_data_is_refused_before_stage_1(trained, in_tmp_path):
    root, common, _ = trained
    args = ["--model=PerPEFT", *common[1:], "--dataset=runb", f"--global_checkpoint={checkpoint_of(trained)}"]
    with pytest.raises(SystemExit) as stop:
        load_entry_point().main(args)
    assert re.search(r"^error: global_checkpoint=\S+ was trained on runa: .*; this run has runb", str(stop.value.code))


# --- a full disk while saving a checkpoint ----------------------------------------------------------------------

DISK_FULL_SCRIPT = """
import resource, signal, sys, torch
from recbole_perpeft.compat import SafeCheckpointMixin
from recbole_perpeft.resume import ResumableTrainerMixin

class Trainer(ResumableTrainerMixin, SafeCheckpointMixin):
    def _checkpoint_state(self, epoch):
        return {"epoch": epoch, "w": torch.zeros(self.size)}

trainer = object.__new__(Trainer)
trainer.config, trainer.saved_model_file, trainer.size = {"single_spec": True}, sys.argv[1], 10
trainer._save_checkpoint(0, verbose=False)  # a small first checkpoint fits
# A file-size limit fails the write as a full disk does (torch: "unexpected pos"): the same path is tested.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
trainer.size = 10**6
try:
    trainer._save_checkpoint(1, verbose=False)
except OSError as err:
    print(type(err).__name__, err)
"""


def test_a_full_disk_while_saving_is_named_and_leaves_the_last_checkpoint_whole(tmp_path):
    target = tmp_path / "saved" / "run.pth"
    target.parent.mkdir()
    done = subprocess.run([sys.executable, "-c", DISK_FULL_SCRIPT, str(target)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.match(r"DiskFull no space left on device, or the file size limit reached \(ulimit -f: 65536 bytes\): "
                    rf"saving checkpoint {re.escape(str(target))} failed .*"
                    r"free space or use --checkpoint_dir", done.stdout), done.stdout  # fmt: skip
    assert [p.name for p in target.parent.iterdir()] == ["run.pth"]  # no temporary file left
    assert torch.load(target, weights_only=True)["epoch"] == 0


# --- a dead process of a --nproc run -----------------------------------------------------------------------------


def _one_rank_killed(config_dict, checkpoint):
    """Rank 1 is killed; rank 0 then fails as gloo makes it fail (its peer gone)."""
    if config_dict["local_rank"] == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    report_checkpoint(checkpoint)
    time.sleep(1)
    raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection reset by peer")


def test_a_killed_process_is_named_with_the_file_to_resume_not_its_peers_traceback(tmp_path, capfd):
    best = tmp_path / "GlobalPEFT-x.pth"
    (tmp_path / "GlobalPEFT-x-last.pth").write_bytes(b"")
    with pytest.raises(WorkerDied, match=r"^rank 1 \(pid \d+\) was killed by SIGKILL; the other processes") as died:
        launch(_one_rank_killed, Launch(nproc=2, world_size=2), {"checkpoint": str(best)})
    assert died.value.checkpoint == str(tmp_path / "GlobalPEFT-x-last.pth")
    assert "Traceback" not in capfd.readouterr().err


def test_the_command_line_says_how_to_resume_after_a_dead_process(monkeypatch):
    from recbole_perpeft import quick_start

    def dies(*args, **kwargs):
        raise WorkerDied("rank 1 (pid 7) was killed by SIGKILL; the other processes stopped with it", "s/x-last.pth")

    monkeypatch.setattr(quick_start, "run", dies)
    with pytest.raises(SystemExit) as stop:
        load_entry_point().main(["--model=GlobalPEFT", "--nproc=2"])
    assert stop.value.code == ("error: rank 1 (pid 7) was killed by SIGKILL; the other processes stopped with it: "
                               "resume with  recbole-perpeft --model=GlobalPEFT --nproc=2 --resume=s/x-last.pth")


def test_an_older_checkpoint_whose_weights_do_not_fit_is_refused_in_one_line(trained, in_tmp_path):
    root, common, _ = trained
    saved = torch.load(checkpoint_of(trained), weights_only=True)
    for key in ("data_fingerprint", "run_keys"):  # as written before checkpoints recorded them
        saved.pop(key)
    old = in_tmp_path / "old.pth"
    torch.save(saved, old)
    with pytest.raises(SystemExit) as stop:
        load_entry_point().main([*common, "--dataset=runa", "--MAX_ITEM_LIST_LENGTH=5", f"--resume={old}"])
    message = str(stop.value.code)
    assert re.match(rf"error: --resume={re.escape(str(old))}: its weights do not fit this model \(size mismatch for "
                    r".*\): it was trained with other settings or data", message) and "\n" not in message, message
