"""run_recbole_perpeft.py end to end: training, evaluation, result JSON, checkpoints, resuming,
and the errors a user sees."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from recbole_perpeft.cli import parse_args
from recbole_perpeft.config import Config, known_keys
from recbole_perpeft.quick_start import run
from recbole_perpeft.utils import get_trainer
from tests.tiny import (
    POSTERS_DIR,
    build_model,
    load_entry_point,
    make_atomic_dataset,
    make_tiny_clip,
    quick_config,
    run_script,
)

DATASET = "e2eds"
METRICS = {"hit@20", "ndcg@20", "hit@30", "ndcg@30"}
OUR_COMPONENTS = {"projector", "missing_modality_placeholders", "item_id_embedding", "backbone"}
TEXT_DIM, IMAGE_DIM = 384, 1280  # all-MiniLM-L6-v2, EfficientNet-Lite0


@pytest.fixture(scope="module")
def data_keys(tmp_path_factory):
    # 40 items: full ranking scores them all and the paper's metrics go up to top-30.
    return make_atomic_dataset(tmp_path_factory.mktemp("data"), DATASET, n_users=30, n_items=40)


@pytest.fixture
def config_file(tmp_path, data_keys):
    """A YAML file with the dataset's keys and small model sizes (passed with --config_files)."""
    keys = quick_config(tmp_path, **data_keys)
    keys.pop("epochs")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(keys))
    return path


def check_metrics(result: dict) -> None:
    for key in ("best_valid_result", "test_result"):
        assert METRICS <= set(result[key]), result[key]
        assert all(0.0 <= result[key][m] <= 1.0 for m in METRICS)
    for key in ("train", "eval"):
        assert isinstance(result["seconds"][key], float) and result["seconds"][key] >= 0


# --- training runs through the command line ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("model", ["GlobalPEFT", "FrozenMM", "SASRec"])
def test_command_line_run_writes_result_json(model, tmp_path, config_file):
    result_file = tmp_path / "out" / "result.json"
    proc = run_script(
        [f"--model={model}", f"--dataset={DATASET}", f"--config_files={config_file}", "--epochs=1",
         f"--result_file={result_file}", "--checkpoint_dir=saved"],  # relative: the result says where, absolute
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(result_file.read_text())
    assert result["model"] == model and result["dataset"] == DATASET
    assert result["config"]["model"] == model and result["config"]["epochs"] == 1
    assert result["config"]["hidden_size"] == 16  # from --config_files
    check_metrics(result)
    assert result["seconds"]["per_epoch"] is None or len(result["seconds"]["per_epoch"]) == 1

    counts = result["trainable_parameters"]
    assert counts["total"] > 0
    if model == "SASRec":  # RecBole's model: counted by child module, no foundation model
        assert counts["item_embedding"] == 41 * 16 and "foundation_model_frozen" not in counts
    else:
        assert OUR_COMPONENTS <= set(counts) and counts["foundation_model_frozen"] > 10**7
        assert counts["missing_modality_placeholders"] == TEXT_DIM + IMAGE_DIM  # titles and images
        assert ("peft_adapter" in counts) == (model == "GlobalPEFT")
        assert result["config"]["peft_type"] == ("LORA" if model == "GlobalPEFT" else None)
        assert "Item modalities: ['text', 'image']" in proc.stderr + proc.stdout
    assert counts["total"] == sum(v for k, v in counts.items() if k not in ("total", "foundation_model_frozen"))

    checkpoint = torch.load(result["checkpoint"], weights_only=True)
    assert Path(result["checkpoint"]).is_absolute() and Path(result["checkpoint"]).parent == tmp_path / "saved"
    assert checkpoint["epoch"] == 0 and checkpoint["config"]["model"] == model
    if model == "GlobalPEFT":  # trained adapters in, frozen foundation weights out
        keys = [k for k in checkpoint["state_dict"] if k.startswith("item_tower.foundation.")]
        assert keys and all("lora_" in k for k in keys)


@pytest.mark.slow
def test_ml100k_with_posters_uses_both_modalities(tmp_path):
    if not POSTERS_DIR.is_dir() or not any(POSTERS_DIR.glob("*.jpg")):
        pytest.skip(f"ml-100k posters not found at {POSTERS_DIR} (optional; see dataset/README.md)")
    result_file = tmp_path / "result.json"
    proc = run_script(
        ["--model=GlobalPEFT", "--dataset=ml-100k", f"--image_dir={POSTERS_DIR}", "--user_sample_ratio=0.05",
         "--epochs=1", "--show_progress=False", f"--cache_dir={tmp_path / 'cache'}",
         f"--checkpoint_dir={tmp_path / 'saved'}", f"--result_file={result_file}"],
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    output = proc.stderr + proc.stdout
    assert "Item modalities: ['text', 'image']" in output
    assert "kept 47 of 943 users" in output
    result = json.loads(result_file.read_text())
    assert result["dataset"] == "ml-100k" and result["config"]["image_dir"] == str(POSTERS_DIR)
    assert result["trainable_parameters"]["missing_modality_placeholders"] == TEXT_DIM + IMAGE_DIM
    assert result["trainable_parameters"]["peft_adapter"] > 0
    check_metrics(result)


# --- resuming ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_continues_after_the_saved_epoch(tmp_path, data_keys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # RecBole's log/ and log_tensorboard/
    clip = make_tiny_clip(tmp_path / "clip")
    keys = quick_config(tmp_path, **data_keys, foundation_model="clip", clip_path=clip.path)
    first = run("GlobalPEFT", DATASET, config_dict={**keys, "checkpoint_dir": str(tmp_path / "run1")})
    checkpoint_file = first["checkpoint"]
    checkpoint = torch.load(checkpoint_file, weights_only=True)  # plain tensors and values only
    assert checkpoint["epoch"] == 0 and checkpoint["optimizer"]["state"]

    config, model, train_data, valid_data, _ = build_model(
        "GlobalPEFT", DATASET, {**keys, "epochs": 2, "checkpoint_dir": str(tmp_path / "run2")}, seed=7
    )
    # RecBole's resume_checkpoint goes on saving into the file it resumed from: resume from copies.
    shutil.copy(first["checkpoint"], tmp_path / "copy.pth")
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    trainer.resume_checkpoint(tmp_path / "copy.pth")
    assert trainer.start_epoch == 1
    state = model.state_dict()
    assert state.keys() == checkpoint["state_dict"].keys()
    assert all(torch.equal(state[k], v) for k, v in checkpoint["state_dict"].items())
    trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    assert len(trainer.epoch_seconds) == 2  # epoch 0's seconds came from the checkpoint

    # The same through the command line (in-process): one more epoch, then evaluation.
    result_file = tmp_path / "resumed.json"
    overrides = [f"--{k}={v}" for k, v in keys.items() if k not in ("load_col", "epochs", "checkpoint_dir")]
    load_entry_point().main(
        ["--model=GlobalPEFT", f"--dataset={DATASET}", f"--resume={checkpoint_file}", "--epochs=2",
         f"--load_col={keys['load_col']}", f"--checkpoint_dir={tmp_path / 'run3'}",
         f"--result_file={result_file}", *overrides]
    )  # fmt: skip
    resumed = json.loads(result_file.read_text())
    assert resumed["config"]["epochs"] == 2 and len(resumed["seconds"]["per_epoch"]) == 2
    check_metrics(resumed)


# --- errors -------------------------------------------------------------------------------------------------


def test_unknown_model_exits_with_a_message_listing_ours(tmp_path):
    proc = run_script(["--model=NoSuchModel", "--dataset=ml-100k"], cwd=tmp_path, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "NoSuchModel" in proc.stderr and "GlobalPEFT" in proc.stderr and "FrozenMM" in proc.stderr


def test_model_name_in_wrong_case_gets_the_same_clear_message(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        load_entry_point().main(["--model=sasrec", "--dataset=ml-100k"])
    assert "sasrec" in str(info.value.code) and "case-sensitive" in str(info.value.code)


@pytest.mark.parametrize(
    "args, expected",
    [
        pytest.param(["--dataset=no_such_data"], ["no_such_data.inter"], id="unknown-dataset"),
        pytest.param(["--user_sample_ratio=2"], ["user_sample_ratio", "2"], id="ratio-out-of-range"),
        pytest.param(["--modalities=['audio']"], ["modalities", "audio"], id="unknown-modality"),
        pytest.param(["--peft_type=NOPE"], ["peft_type", "NOPE", "LORA", "IISAN", "CROSSAN"], id="unknown-peft-type"),
        pytest.param(["--n_group=4"], ["unknown config key 'n_group'", "did you mean 'n_groups'", "extra_keys"],
                     id="misspelled-key"),
        pytest.param(["--MAX_ITEM_LIST_LENGTH=0"], ["MAX_ITEM_LIST_LENGTH", "positive integer", "0"],
                     id="zero-sequence-length"),
        pytest.param(["--peft_config=lora_dropout=0.5"], ["peft_config must be a mapping", "lora_dropout=0.5"],
                     id="peft-config-not-a-mapping"),
    ],
)
def test_bad_input_exits_non_zero_naming_it(args, expected, tmp_path, data_keys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--model=GlobalPEFT", f"--dataset={DATASET}", f"--data_path={data_keys['data_path']}",
            f"--load_col={data_keys['load_col']}", "--text_field=title", f"--image_dir={data_keys['image_dir']}",
            f"--cache_dir={tmp_path / 'cache'}", "--show_progress=False", *args]  # fmt: skip
    with pytest.raises(SystemExit) as info:
        load_entry_point().main(argv)
    code = info.value.code
    assert isinstance(code, str) and code.startswith("error: ")  # sys.exit(message): exit status 1
    for fragment in expected:
        assert fragment in code


def test_own_keys_pass_when_declared_and_flow_syntax_is_parsed(tmp_path, data_keys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args, files, overrides = parse_args(
        [f"--dataset={DATASET}", "--my_note=hello", "--extra_keys=[my_note]", "--peft_config={lora_dropout: 0.5}"]
    )
    config = Config(model="GlobalPEFT", dataset=DATASET, config_dict={**data_keys, **overrides})
    assert config["my_note"] == "hello"
    assert config["peft_config"] == {"lora_dropout": 0.5}


def test_every_key_our_code_reads_is_known():
    """A key read by recbole_perpeft but declared in no property file would be refused from users."""
    read = re.compile(r"""\bconfig\[\s*["']([A-Za-z_][A-Za-z0-9_]*)["']\s*\]""")
    package = Path(__file__).resolve().parents[1] / "recbole_perpeft"
    keys = {key for path in package.rglob("*.py") for key in read.findall(path.read_text())}
    assert len(keys) > 50
    assert keys - known_keys() == set()


def test_malformed_yaml_names_the_file_and_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 2\npeft_config: {r: 8\nlearning_rate: 0.001\n")
    with pytest.raises(SystemExit) as info:
        load_entry_point().main(["--model=GlobalPEFT", f"--dataset={DATASET}", f"--config_files={bad}"])
    message = info.value.code
    assert message.startswith(f"error: config file {bad}: line ") and "not valid YAML" in message
    bad.write_text("- a\n- b\n")
    with pytest.raises(SystemExit) as info:
        load_entry_point().main(["--model=GlobalPEFT", f"--dataset={DATASET}", f"--config_files={bad}"])
    assert "must hold `key: value` lines, not a list" in info.value.code


@pytest.mark.slow
def test_bad_config_value_exits_non_zero_from_the_command_line(tmp_path, config_file):
    proc = run_script(
        ["--model=FrozenMM", f"--dataset={DATASET}", f"--config_files={config_file}", "--user_sample_ratio=2"],
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "user_sample_ratio" in proc.stderr and "Traceback" not in proc.stderr
