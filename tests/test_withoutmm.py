"""WithoutMM ("w/o MM", the paper's ablation): GlobalPEFT's pipeline with the ID embedding as the item vector.
Found by name; builds no foundation model and no cache; has only ID embeddings and the backbone; trains
(its loss falls) with both backbones and every loss_type; a whole run writes its result and checkpoint."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from recbole.utils import init_seed

from recbole_perpeft.data import create_dataset, data_preparation
from recbole_perpeft.model import item_tower
from recbole_perpeft.model.sequential_recommender.globalpeft import LOSS_TYPES, GlobalPEFT
from recbole_perpeft.model.sequential_recommender.withoutmm import WithoutMM
from recbole_perpeft.quick_start import run
from recbole_perpeft.trainer import PEFTTrainer
from recbole_perpeft.utils import get_model, our_model_names

BACKBONES = ("SASRec", "LightGCN")
SMALL = {"hidden_size": 16, "inner_size": 32, "n_heads": 2, "train_batch_size": 8, "pair_batch_size": 64,
         "sampled_softmax_negatives": 16}  # fmt: skip


@pytest.fixture(autouse=True)
def no_foundation(monkeypatch):
    """Building any foundation model or item tower fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("WithoutMM built a foundation model / item tower")

    monkeypatch.setattr(item_tower, "build_foundation", refuse)
    monkeypatch.setattr(item_tower.ItemTower, "__init__", refuse)


def build(toy_dataset, toy_config, **overrides):
    config = toy_config("WithoutMM", toy_dataset, **{**SMALL, **overrides})
    init_seed(config["seed"], True)
    train_data, valid_data, test_data = data_preparation(config, create_dataset(config), WithoutMM)
    init_seed(config["seed"], True)
    return config, WithoutMM(config, train_data._dataset), train_data, valid_data, test_data


def test_found_by_name_with_its_yaml():
    assert get_model("WithoutMM") is WithoutMM and issubclass(WithoutMM, GlobalPEFT)
    assert "WithoutMM" in our_model_names()
    assert not WithoutMM.has_item_tower and GlobalPEFT.has_item_tower


@pytest.mark.parametrize("backbone", BACKBONES)
def test_only_id_embeddings_and_the_backbone_no_foundation_no_cache(toy_dataset, toy_config, tmp_path, backbone):
    config, model, *_ = build(toy_dataset, toy_config, backbone=backbone)
    assert model.item_tower is None
    assert config["peft_type"] is None  # properties/model/WithoutMM.yaml
    prefixes = {name.split(".")[0] for name, _ in model.named_parameters()}
    assert prefixes == {"item_id_embedding", "backbone"}
    assert {key.split(".")[0] for key in model.state_dict()} == {"item_id_embedding", "backbone"}
    assert not (tmp_path / "cache").exists()  # no token, image or feature cache
    model.eval()
    table = model.item_table()
    assert torch.equal(table, model.item_id_embedding.weight)  # the item vector is the ID embedding
    assert model.foundation_parameter_count() == 0
    assert set(model.parameter_components()) == {"item_id_embedding", "backbone"}


@pytest.mark.parametrize(("backbone", "loss_type"), list(itertools.product(BACKBONES, LOSS_TYPES)))
def test_trains_with_every_backbone_and_loss_and_its_loss_falls(toy_dataset, toy_config, in_tmp_path, backbone,
                                                                loss_type):  # fmt: skip
    config, model, train_data, *_ = build(toy_dataset, toy_config, backbone=backbone, loss_type=loss_type,
                                          learning_rate=1e-2)  # fmt: skip
    trainer = PEFTTrainer(config, model)
    losses = [trainer._train_epoch(train_data, epoch) for epoch in range(6)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.95 * losses[0], losses


def test_cmsa_is_refused_naming_the_key(toy_dataset, toy_config):
    with pytest.raises(ValueError, match="cmsa_weight: 0"):
        build(toy_dataset, toy_config, cmsa_weight=0.1)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_a_whole_run_with_all_windows_and_sampled_softmax(toy_dataset, base_config, in_tmp_path, backbone):
    keys = {**base_config, **SMALL, "data_path": str(toy_dataset.root), "text_field": "title", "epochs": 2,
            "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title"]},
            "loss_type": "SAMPLED_SOFTMAX", "backbone": backbone}  # fmt: skip
    if backbone == "SASRec":  # LightGCN refuses a window key (it trains on pairs)
        keys["train_windows"] = "all"
    result = run("WithoutMM", toy_dataset.name, config_dict=keys, result_file=str(in_tmp_path / "r.json"))
    saved = json.loads((in_tmp_path / "r.json").read_text())
    assert saved["model"] == "WithoutMM" and set(saved["test_result"]) == {"hit@5", "ndcg@5"}
    parameters = result["trainable_parameters"]
    assert set(parameters) == {"item_id_embedding", "backbone", "total", "foundation_model_frozen"}
    assert parameters["foundation_model_frozen"] == 0
    assert parameters["total"] == parameters["item_id_embedding"] + parameters["backbone"]
    state = torch.load(result["checkpoint"], weights_only=True)["state_dict"]
    assert {key.split(".")[0] for key in state} == {"item_id_embedding", "backbone"}


# --- loss_positions: last (RecBole SASRec's one target per training sequence) -----------------------------


def test_last_target_only_keeps_each_rows_final_target():
    from recbole_perpeft.model.backbones.sasrec import last_target_only

    target = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    expected = torch.tensor([[0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(last_target_only(target), expected)


def test_loss_positions_last_scores_one_target_per_window_and_trains(toy_dataset, toy_config):
    from recbole_perpeft.data.dataloader import TARGET_LIST

    _, model, train_data, *_ = build(toy_dataset, toy_config, loss_positions="last", loss_type="SAMPLED_SOFTMAX")
    batch = next(iter(train_data))
    items, vectors, _, own, _ = model.encode_batch(model.backbone.batch_items(batch), batch)
    triples = model.backbone.triples(batch, items, vectors, own)
    targets = batch[TARGET_LIST]
    last = targets.gather(1, ((targets > 0).sum(1) - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    assert torch.equal(triples.pos_items, last[last > 0])  # the window's last next item, one per window
    _, every, *_ = build(toy_dataset, toy_config, loss_type="SAMPLED_SOFTMAX")  # default: every position
    assert len(every.backbone.triples(batch, items, vectors, own).pos_items) == int((targets > 0).sum())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = model.calculate_loss(batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_loss_positions_refuses_an_unknown_value_naming_the_key(toy_dataset, toy_config):
    with pytest.raises(ValueError, match="loss_positions"):
        build(toy_dataset, toy_config, loss_positions="first")
