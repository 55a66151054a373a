"""A new backbone needs no change to the package (docs/extending.md): a toy backbone registered here
by name, with a key of its own, runs GlobalPEFT (train step, evaluation, grouping vectors) and PerPEFT's
stage 2 (group batches, per-group tables) on the tiny CLIP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from recbole_perpeft.data.dataloader import NEG_LIST, TARGET_LIST, user_sequences
from recbole_perpeft.grouping import fit_user_groups
from recbole_perpeft.model.backbones import Backbone, Triples, get_backbone, register_backbone
from recbole_perpeft.model.backbones.sasrec import SASRecBackbone
from recbole_perpeft.two_stage import stage_config
from tests.tiny import build_model, make_atomic_dataset, make_tiny_clip, quick_config

DATASET = "toybackbone"


# --- the toy backbone: all a new user side needs ------------------------------------------------------------


@register_backbone("MeanPool")
class MeanPoolBackbone(Backbone):
    """User vector = a learned scale times the mean of the sequence's item vectors; trained on SASRec's
    batches (one sequence per user, a target and a negative at every position)."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.ITEM_SEQ = config["ITEM_ID_FIELD"] + config["LIST_SUFFIX"]
        self.scale = nn.Parameter(torch.full((config["hidden_size"],), float(config["toy_scale"])))

    training_loader = SASRecBackbone.training_loader  # reuse the sequence loaders

    def batch_items(self, interaction):
        return torch.stack([interaction[self.ITEM_SEQ], interaction[TARGET_LIST], interaction[NEG_LIST]])

    def _prefix_means(self, emb, seq):
        """[B, L, H]: at each position the mean of the items up to it (padding excluded)."""
        real = (seq > 0).unsqueeze(-1).float()
        return self.scale * (emb * real).cumsum(1) / real.cumsum(1).clamp(min=1)

    def triples(self, interaction, items, vectors, inverse):
        emb = vectors[inverse]  # [3, B, L, H]
        seq, pos = interaction[self.ITEM_SEQ], interaction[TARGET_LIST]
        mask = pos > 0
        return Triples(user=self._prefix_means(emb[0], seq)[mask], pos=emb[1][mask], neg=emb[2][mask],
                       pos_items=pos[mask])  # fmt: skip

    def user_vectors(self, interaction, table):
        seq = interaction[self.ITEM_SEQ]
        real = (seq > 0).unsqueeze(-1).float()
        return self.scale * (table[seq] * real).sum(1) / real.sum(1).clamp(min=1)

    def interest_vectors(self, dataset, table, batch_size):
        users = user_sequences(dataset)
        with torch.no_grad():
            vectors = self.user_vectors(users, table)
        return users[dataset.uid_field].numpy(), vectors.numpy()


# --- in the models ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy-backbone")
    clip = make_tiny_clip(root / "clip")
    data_keys = make_atomic_dataset(root / "data", DATASET, n_users=20, n_items=25)
    return quick_config(root, **data_keys, foundation_model="clip", clip_path=clip.path, peft_type="iisan",
                        topk=[5, 10], valid_metric="hit@10", backbone="MeanPool", toy_scale=0.5,
                        extra_keys=["toy_scale"])  # fmt: skip


def test_toy_backbone_is_found_by_name():
    assert get_backbone("MeanPool") is MeanPoolBackbone and get_backbone("meanpool") is MeanPoolBackbone
    with pytest.raises(ValueError, match="MeanPool"):  # the known ones are listed
        get_backbone("NoSuchBackbone")


def test_toy_backbone_trains_and_evaluates_globalpeft(keys):
    config, model, train_data, valid_data, _ = build_model("GlobalPEFT", DATASET, keys)
    assert isinstance(model.backbone, MeanPoolBackbone)
    assert torch.equal(model.backbone.scale, torch.full_like(model.backbone.scale, 0.5))  # its own key
    model.train()
    model.calculate_loss(next(iter(train_data))).backward()
    assert model.backbone.scale.grad is not None and model.backbone.scale.grad.abs().sum() > 0
    assert model.item_id_embedding.weight.grad.abs().sum() > 0  # the item side trains through it
    model.eval()
    batch = next(iter(valid_data))[0]
    scores = model.full_sort_predict(batch)
    table = model.item_table()
    expected = model.backbone.user_vectors(batch, table) @ table.T
    torch.testing.assert_close(scores, expected)
    user_ids, vectors = model.backbone.interest_vectors(train_data._dataset, table, 8)
    assert vectors.shape == (len(user_ids), config["hidden_size"]) and np.isfinite(vectors).all()


def test_toy_backbone_runs_perpeft_stage2(keys):
    from recbole_perpeft.model.sequential_recommender.perpeft import PerPEFT

    config, global_model, train_data, valid_data, _ = build_model("GlobalPEFT", DATASET, keys)
    dataset = train_data._dataset
    global_model.eval()
    user_ids, vectors = global_model.backbone.interest_vectors(dataset, global_model.item_table(), 8)
    groups = fit_user_groups(vectors, user_ids, dataset.user_num, 2, "kmeans", 2024)
    staged = stage_config(config, "PerPEFT", 1, n_groups=2, grouping_method="kmeans")
    model = PerPEFT(staged, dataset)
    model.load_global(global_model.state_dict(), groups)
    assert isinstance(model.global_backbone, MeanPoolBackbone)
    loader = model.backbone.training_loader(staged, dataset, train_data._sampler, groups.labels)
    batch = next(iter(loader))
    model.train()
    model.calculate_loss(batch).backward()
    group = int(batch["group_id"][0])
    assert all(p.grad is not None for p in model.item_tower.group_adapter_parameters(group))
    model.eval()
    scores = model.full_sort_predict(next(iter(valid_data))[0])
    assert scores.shape[1] == model.n_items and torch.isfinite(scores).all()
