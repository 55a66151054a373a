"""--preset: recbole (the default, today's behaviour) and paper (the official PerPEFT code's values), a YAML layer
over the model/backbone/adapter files and under the user's files and command line. Each of the paper preset's
keys here: its value, and that the code reading it does what the key says."""

from __future__ import annotations

import json

import numpy as np
import pytest
from recbole.utils import init_seed

from recbole_perpeft import presets
from recbole_perpeft.adapters.peft_adapter import PeftFamily
from recbole_perpeft.adapters.registry import family_defaults, family_settings
from recbole_perpeft.data import create_dataset, data_preparation
from recbole_perpeft.data.history_mask import HistoryMaskedFullSortEvalDataLoader
from recbole_perpeft.data.sampler import GroupNegativeSampler, SequenceNegativeSampler
from recbole_perpeft.encoders.clip import ClipFoundation
from recbole_perpeft.model.backbones.sasrec import GroupedUserSequenceDataLoader, UserSequenceDataLoader
from recbole_perpeft.model.sequential_recommender.withoutmm import WithoutMM
from recbole_perpeft.quick_start import run
from recbole_perpeft.trainer import PEFTTrainer
from tests.tiny import make_tiny_clip

# key -> (the paper preset's value, the recbole preset's = our default)
PAPER_KEYS = {
    "eval_exclude_history": (True, False),
    "text_max_length": (77, 32),
    "weight_decay": (1e-4, 0.0),
    "item_id_norm_penalty": (1e-6, 0.0),
    "negative_exclude": ("history", "window"),
    # the model side (i39b's switches; IISAN's and the grouping's keys: tests/test_paper_model_switches.py)
    "modality_norm": ("official", "layernorm"),
    "projector_hidden_size": (64, 256),
    "projector_hidden_norm": (True, False),
    "projector_activation": ("relu", "gelu"),
    "projector_dropout": (0.0, 0.1),
    "projector_output_norm": (True, False),
    "projector_layer_norm_eps": (1e-8, 1e-5),
    "multimodal_weight": (0.5, 1.0),
    "sasrec_variant": ("official", "recbole"),
    "inner_size": (32, 128),
    "hidden_act": ("relu", "gelu"),
    "layer_norm_eps": (1e-8, 1e-12),
}
SMALL = {"hidden_size": 16, "inner_size": 32, "n_heads": 2, "train_batch_size": 8}


@pytest.mark.parametrize("key", sorted(PAPER_KEYS))
def test_each_paper_key_and_the_default_preset(toy_dataset, toy_config, key):
    paper, ours = PAPER_KEYS[key]
    default = toy_config("GlobalPEFT", toy_dataset)
    assert default["preset"] == "recbole" and default[key] == ours
    assert toy_config("GlobalPEFT", toy_dataset, preset="recbole")[key] == ours
    config = toy_config("GlobalPEFT", toy_dataset, preset="paper")
    assert config["preset"] == "paper" and config[key] == paper
    # the user's command line (or files) still override a preset's key
    assert toy_config("GlobalPEFT", toy_dataset, preset="paper", **{key: ours})[key] == ours


def test_a_config_file_overrides_the_preset_too(toy_dataset, base_config, tmp_path):
    from recbole_perpeft.config import Config

    file = tmp_path / "mine.yaml"
    file.write_text("preset: paper\ntext_max_length: 50\n")
    config = Config(model="GlobalPEFT", dataset=toy_dataset.name, config_file_list=[str(file)],
                    config_dict={**base_config, "data_path": str(toy_dataset.root)})  # fmt: skip
    assert config["preset"] == "paper" and config["text_max_length"] == 50 and config["weight_decay"] == 1e-4


def test_an_unknown_preset_is_refused_naming_the_known_ones(toy_dataset, toy_config):
    with pytest.raises(ValueError, match=r"preset must be one of paper, recbole, got 'papers'"):
        toy_config("GlobalPEFT", toy_dataset, preset="papers")


def test_the_preset_files_own_mapping_is_no_config_key(toy_dataset, toy_config):
    with pytest.raises(ValueError, match="unknown config key 'for_peft_type'"):
        toy_config("GlobalPEFT", toy_dataset, for_peft_type={"LORA": {}})


def test_lora_dropout_under_the_paper_preset_merges_with_the_users_peft_config(toy_dataset, toy_config):
    assert PeftFamily.peft_kwargs(toy_config("GlobalPEFT", toy_dataset), "LORA")[0]["lora_dropout"] == 0.0
    kwargs = PeftFamily.peft_kwargs(toy_config("GlobalPEFT", toy_dataset, preset="paper"), "LORA")[0]
    assert kwargs == {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1}
    config = toy_config("GlobalPEFT", toy_dataset, preset="paper", peft_config={"r": 8})
    assert PeftFamily.peft_kwargs(config, "LORA")[0] == {"r": 8, "lora_alpha": 8, "lora_dropout": 0.1}
    config = toy_config("GlobalPEFT", toy_dataset, preset="paper", peft_config={"lora_dropout": 0.0})
    assert PeftFamily.peft_kwargs(config, "LORA")[0]["lora_dropout"] == 0.0
    assert "for_peft_type" not in toy_config("GlobalPEFT", toy_dataset, preset="paper")  # (the preset file's own)
    # LoRA's key only: another peft method's config never receives it
    config = toy_config("GlobalPEFT", toy_dataset, preset="paper", peft_type="IA3")
    assert "lora_dropout" not in PeftFamily.peft_kwargs(config, "IA3")[0]


def test_a_presets_key_wins_over_the_adapter_familys_yaml(toy_dataset, toy_config, tmp_path, monkeypatch):
    """A preset sits over the adapter files: its value of a family key (IISAN's side_adapter_size) is used."""
    folder = tmp_path / "presets"
    folder.mkdir()
    (folder / "recbole.yaml").write_text("")
    (folder / "wide.yaml").write_text("side_adapter_size: 7\n")
    monkeypatch.setattr(presets, "PRESET_DIR", folder)
    default = family_defaults("IISAN")["side_adapter_size"]
    assert default != 7
    config = toy_config("GlobalPEFT", toy_dataset, peft_type="IISAN")
    assert family_settings("IISAN", config)["side_adapter_size"] == default
    config = toy_config("GlobalPEFT", toy_dataset, peft_type="IISAN", preset="wide")
    assert family_settings("IISAN", config)["side_adapter_size"] == 7


def test_clip_text_length_follows_the_key(toy_dataset, toy_config, tmp_path):
    """CLIP cuts titles at text_max_length (32 under recbole, as MiniLM; 77, CLIP's window, under paper)."""
    clip = make_tiny_clip(tmp_path / "clip")
    for preset, length in (("recbole", 32), ("paper", 77)):
        config = toy_config("GlobalPEFT", toy_dataset, preset=preset, foundation_model="clip", clip_path=clip.path)
        assert ClipFoundation(config).text_max_length == length
    config = toy_config("GlobalPEFT", toy_dataset, text_max_length=200, foundation_model="clip", clip_path=clip.path)
    assert ClipFoundation(config).text_max_length == 77  # CLIP's window is the most


def build(toy_dataset, toy_config, **overrides):
    config = toy_config("WithoutMM", toy_dataset, **{**SMALL, **overrides})
    init_seed(config["seed"], True)
    train_data, valid_data, test_data = data_preparation(config, create_dataset(config), WithoutMM)
    init_seed(config["seed"], True)
    return config, WithoutMM(config, train_data._dataset), train_data, valid_data, test_data


def test_weight_decay_and_item_id_norm_reach_the_optimizer_and_the_model(toy_dataset, toy_config, in_tmp_path):
    for preset, (decay, penalty) in (("recbole", (0.0, 0.0)), ("paper", (1e-4, 1e-6))):
        config, model, *_ = build(toy_dataset, toy_config, preset=preset)
        trainer = PEFTTrainer(config, model)
        assert {group["weight_decay"] for group in trainer.optimizer.param_groups} == {decay}
        assert model.item_id_norm_penalty == penalty


def test_eval_exclude_history_under_the_paper_preset(toy_dataset, toy_config, in_tmp_path):
    *_, valid_data, test_data = build(toy_dataset, toy_config, preset="paper")
    assert isinstance(valid_data, HistoryMaskedFullSortEvalDataLoader)
    assert isinstance(test_data, HistoryMaskedFullSortEvalDataLoader)
    *_, valid_data, _ = build(toy_dataset, toy_config)
    assert not isinstance(valid_data, HistoryMaskedFullSortEvalDataLoader)


def drawn_negatives(toy_dataset, toy_config, exclude: str, epochs: int = 30):
    """(user ids, negatives [rows, L], each row's whole training history) over ``epochs`` passes of a window
    loader whose windows (3 items) are shorter than the users' histories (6-10 training items)."""
    config, _, train_data, *_ = build(toy_dataset, toy_config, MAX_ITEM_LIST_LENGTH=3, negative_exclude=exclude)
    dataset = train_data._dataset
    loader = UserSequenceDataLoader(config, dataset, SequenceNegativeSampler(dataset.item_num, seed=0))
    history = {}
    for uid, seq, length, target in zip(dataset.inter_feat[dataset.uid_field].tolist(),
                                        dataset.inter_feat[dataset.item_id_list_field].tolist(),
                                        dataset.inter_feat[dataset.item_list_length_field].tolist(),
                                        dataset.inter_feat[dataset.iid_field].tolist(), strict=True):  # fmt: skip
        history.setdefault(uid, set()).update(seq[:length] + [target])
    rows = []
    for _ in range(epochs):
        for batch in loader:
            for uid, window, negatives in zip(batch[dataset.uid_field].tolist(), batch["item_id_list"].tolist(),
                                              batch["neg_item_list"].tolist(), strict=True):  # fmt: skip
                rows.append((history[uid], set(window), negatives))
    return rows


def test_negatives_avoid_the_whole_training_history_under_negative_exclude_history(toy_dataset, toy_config,
                                                                                     in_tmp_path):  # fmt: skip
    rows = drawn_negatives(toy_dataset, toy_config, "history")
    assert all(not set(negatives) & history for history, _, negatives in rows)
    assert all(0 not in negatives for _, _, negatives in rows)
    # window (today's default): a negative may be a past item outside the window, never one inside it
    rows = drawn_negatives(toy_dataset, toy_config, "window")
    assert all(not set(negatives) & window for _, window, negatives in rows)
    assert sum(len(set(negatives) & history) for history, _, negatives in rows) > 0


def test_group_negatives_avoid_the_whole_history_and_stay_in_the_groups_pool(toy_dataset, toy_config, in_tmp_path):
    """PerPEFT's loader under negative_exclude: history: a group's negatives come from its pool, never from the
    user's whole training history."""
    config, _, train_data, *_ = build(toy_dataset, toy_config, MAX_ITEM_LIST_LENGTH=3, negative_exclude="history")
    dataset = train_data._dataset
    group_of_user = np.arange(dataset.user_num) % 2
    pools = [np.arange(1, dataset.item_num), np.arange(1, dataset.item_num)[::2]]  # group 1: every other item
    sampler = GroupNegativeSampler(dataset.item_num, seed=0, pools=pools)
    loader = GroupedUserSequenceDataLoader(config, dataset, sampler, group_of_user)
    history = {}
    for uid, seq, length, target in zip(dataset.inter_feat[dataset.uid_field].tolist(),
                                        dataset.inter_feat[dataset.item_id_list_field].tolist(),
                                        dataset.inter_feat[dataset.item_list_length_field].tolist(),
                                        dataset.inter_feat[dataset.iid_field].tolist(), strict=True):  # fmt: skip
        history.setdefault(uid, set()).update(seq[:length] + [target])
    seen = 0
    for _ in range(20):
        for batch in loader:
            group = int(batch["group_id"][0])
            for uid, negatives in zip(batch[dataset.uid_field].tolist(), batch["neg_item_list"].tolist(),
                                      strict=True):  # fmt: skip
                assert not set(negatives) & history[uid]
                assert set(negatives) <= set(pools[group].tolist())
                seen += 1
    assert seen > 0


def test_negative_exclude_refuses_an_unknown_value(toy_dataset, toy_config, in_tmp_path):
    with pytest.raises(ValueError, match="negative_exclude must be one of window, history, got 'all'"):
        build(toy_dataset, toy_config, negative_exclude="all")


def test_the_preset_is_recorded_in_the_result_json(toy_dataset, base_config, in_tmp_path):
    result_file = in_tmp_path / "result.json"
    config_dict = {**base_config, **SMALL, "data_path": str(toy_dataset.root), "epochs": 1, "preset": "paper",
                   "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title"]}}
    run(model="WithoutMM", dataset=toy_dataset.name, config_dict=config_dict, result_file=str(result_file))
    config = json.loads(result_file.read_text())["config"]
    assert config["preset"] == "paper" and config["eval_exclude_history"] is True
    assert np.isclose(config["weight_decay"], 1e-4)
