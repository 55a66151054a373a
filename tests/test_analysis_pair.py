"""recbole_perpeft.analysis on the text + image pair (all-MiniLM-L6-v2, mean pooling; EfficientNet-Lite0,
frozen and cached) over a tiny dataset: PerPEFT models built in-process (no training), their group
adapters set by hand, so that identical and different adapters are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recbole_perpeft.analysis.attention import adapter_attention, attention_note, pooling_description, title_items
from recbole_perpeft.analysis.divergence import inter_cluster_per_item
from recbole_perpeft.analysis.gradcam import group_gradcam, group_user_means, map_agreement, target_layer
from recbole_perpeft.grouping import UserGroups
from tests.tiny import build_model, make_atomic_dataset, quick_config

DATASET = "analysispair"


@pytest.fixture(scope="module")
def data_keys(tmp_path_factory):
    return make_atomic_dataset(tmp_path_factory.mktemp("pair"), DATASET, n_users=24, n_items=30)


def grouped(tmp_path_factory, data_keys, peft_type: str):
    """PerPEFT on the pair, every group's adapter a copy of the global one, users split in two groups."""
    root = tmp_path_factory.mktemp(peft_type.lower())
    keys = quick_config(root, **data_keys, foundation_model="text_image", peft_type=peft_type, n_groups=2,
                        image_size=64, topk=[5, 10], valid_metric="hit@10")  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        _, model, train_data, _, _ = build_model("PerPEFT", DATASET, keys)
    dataset = train_data._dataset
    labels = np.where(np.arange(dataset.user_num) > 0, np.arange(dataset.user_num) % 2, -1)
    groups = UserGroups(labels=labels, n_groups=2, method="random", seed=0)
    model.set_groups(groups)
    model.item_tower.copy_global_to_groups()
    model.eval()
    return model, dataset, groups


@pytest.fixture(scope="module")
def lora(tmp_path_factory, data_keys):
    return grouped(tmp_path_factory, data_keys, "LORA")


@pytest.fixture(scope="module")
def iisan(tmp_path_factory, data_keys):
    return grouped(tmp_path_factory, data_keys, "IISAN")


@torch.no_grad()
def perturb_group(model, group: int, seed: int = 0) -> None:
    """Random values in ``group``'s LoRA B matrices (zero at initialisation) and projector."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.item_tower.adapter_parameters(model.item_tower.group_adapter(group)).items():
        if "lora_B" in name:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    for param in model.item_tower.group_projectors[group].parameters():
        param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    model.train(False)  # drop cached item tables


def test_mean_pooled_minilm_attention(lora):
    model, dataset, _ = lora
    tower = model.item_tower
    assert "mean pooling" in pooling_description(tower.foundation)
    items = title_items(model)
    tokens = list(dataset.field2id_token[dataset.iid_field])
    table = adapter_attention(model, items, tokens)
    assert table.adapters == ["global", "group 0", "group 1"] and table.weights.shape[1] == len(items)
    assert np.allclose(table.weights.sum(-1), 1.0)
    # Identical adapters (copies of the global one): identical distributions, inter-cluster JSD 0.
    assert (inter_cluster_per_item(table) == 0).all()
    # The mean-pooling rule, from transformers' own attentions: mean of the real tokens' last-layer rows.
    i = 2
    n = table.lengths[i]
    ids = torch.as_tensor(table.input_ids[i : i + 1, :n])
    tower.foundation.text_model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = tower.foundation.text_model(
                input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True
            )
    finally:
        tower.foundation.text_model.set_attn_implementation("sdpa")
    expected = out.attentions[-1][0].mean(0).mean(0).double().numpy()
    np.testing.assert_allclose(table.distributions(i)[0], expected, atol=1e-6)

    perturb_group(model, 1)
    changed = adapter_attention(model, items, tokens)
    np.testing.assert_allclose(changed.weights[:2], table.weights[:2])  # global and group 0 untouched
    assert (inter_cluster_per_item(changed) > 0).all()


def test_gradcam_on_the_frozen_cached_efficientnet(lora):
    model, dataset, groups = lora
    tower = model.item_tower
    assert "image" not in tower.adapted and "image" in tower.family.features  # frozen, cached features
    assert "_conv_head" in target_layer(tower.foundation)[2]
    means = group_user_means(model, dataset, groups)
    item = 7
    cams = group_gradcam(model, item, means)
    assert cams.maps.shape == (3, 2, 2) and (cams.maps >= 0).all() and cams.maps.max() > 0  # 64 px / 32
    assert cams.pixels.shape == (64, 64, 3)
    for a, group in enumerate([None, 0, 1]):  # recomputed features give the cached table's score
        assert cams.scores[a] == pytest.approx(float(model.item_table(group)[item] @ means[group]), abs=1e-4)
    assert not any(p.requires_grad for p in tower.foundation.image_model.parameters())  # still frozen


def test_gradcam_groups_differ_through_their_projectors(tmp_path_factory, data_keys):
    model, dataset, groups = grouped(tmp_path_factory, data_keys, "LORA")
    means = group_user_means(model, dataset, groups)
    means[1] = means[0]  # the same user vector: only the adapters and projectors can make the maps differ
    # (Grad-CAM keeps the positive part: an untrained model gives some items an all-zero map.)
    item = next(i for i in range(1, 25) if group_gradcam(model, i, means).maps.max() > 0)
    same = group_gradcam(model, item, means)
    np.testing.assert_allclose(same.maps[1], same.maps[2], rtol=1e-5)
    assert map_agreement(same) == pytest.approx(1.0)
    perturb_group(model, 1, seed=3)
    moved = group_gradcam(model, item, means)
    np.testing.assert_allclose(moved.maps[:2], same.maps[:2], rtol=1e-5)
    assert not np.allclose(moved.maps[2], same.maps[2], rtol=1e-3)


def test_side_network_keeps_one_attention_map_and_has_gradcam(iisan):
    model, dataset, groups = iisan
    differs, note = attention_note(model)
    assert not differs and "same under every group" in note and "IISAN" in note
    tokens = list(dataset.field2id_token[dataset.iid_field])
    table = adapter_attention(model, title_items(model)[:5], tokens)
    assert table.adapters == ["global"]
    means = group_user_means(model, dataset, groups)
    cams = group_gradcam(model, 4, means)
    assert cams.maps.shape == (3, 2, 2) and cams.maps.max() > 0
    for a, group in enumerate([None, 0, 1]):  # (the table reads fp16-cached layer states)
        assert cams.scores[a] == pytest.approx(float(model.item_table(group)[4] @ means[group]), rel=1e-2, abs=1e-2)
