"""LATTICE and BM3 (recbole_perpeft/model/general_recommender/): found by the registry, on the sequential models'
users, items and split, scored by RecBole's history-masked full ranking; each learns on tiny data; LATTICE's
graphs are kNN-sparse and symmetric-normalised; BM3 trains without negatives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from recbole.data.dataloader import FullSortEvalDataLoader
from recbole.utils import InputType, ModelType

from recbole_perpeft.data.general_dataset import MultimodalGeneralDataset
from recbole_perpeft.model.multimodal_graph import knn_graph, symmetric_normalise
from recbole_perpeft.utils import get_model, get_trainer, our_model_names
from tests.tiny import build_config, build_model, make_atomic_dataset, make_tiny_clip, quick_config

MODELS = ("LATTICE", "BM3")


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("general")
    clip = make_tiny_clip(root / "clip")
    data = make_atomic_dataset(root / "data", "gen", n_users=30, n_items=25, missing_images=["105"])
    return quick_config(root, **data, foundation_model="clip", clip_path=clip.path, topk=[5], valid_metric="hit@5",
                        state="WARNING", train_batch_size=32, device="cpu", use_gpu=False)  # fmt: skip


def dense(index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(index.shape[0], index.shape[0], dtype=weight.dtype)
    return out.index_put_((torch.arange(index.shape[0]).unsqueeze(1).expand_as(index), index), weight, accumulate=True)


def test_the_registry_finds_both_as_general_models_of_ours():
    assert set(MODELS) <= set(our_model_names())
    for name in MODELS:
        model = get_model(name)
        assert model.__module__ == f"recbole_perpeft.model.general_recommender.{name.lower()}"
        assert model.type == ModelType.GENERAL
        assert "PEFTTrainer" in get_trainer(ModelType.GENERAL, name).__name__
    assert get_model("LATTICE").input_type == InputType.PAIRWISE and get_model("BM3").input_type == InputType.POINTWISE


def test_knn_graph_keeps_k_neighbours_and_is_symmetric_normalised():
    features = torch.randn(12, 6, generator=torch.Generator().manual_seed(0))
    features[0] = 0  # the padding item: no vector
    present = features.abs().sum(1) > 0
    present[5] = False  # an item without the modality
    index, weight = knn_graph(features, 3, present)
    assert index.shape == weight.shape == (12, 3)
    # Reference, densely: cosine similarity, each present row's 3 largest among present items, cut at 0.
    unit = torch.nn.functional.normalize(features, dim=1)
    sim = (unit @ unit.T).masked_fill(~present.unsqueeze(0), float("-inf"))
    top = torch.topk(sim, 3, dim=1)
    s = torch.zeros(12, 12).scatter_(1, top.indices, top.values.clamp_min(0)) * present.unsqueeze(1)
    degree = s.sum(1)
    inv = torch.where(degree > 0, degree.rsqrt(), torch.zeros_like(degree))
    torch.testing.assert_close(dense(index, weight), inv.unsqueeze(1) * s * inv.unsqueeze(0))
    graph = dense(index, weight)
    assert ((graph != 0).sum(1)[present] <= 3).all()
    assert (graph[~present] == 0).all() and (graph[:, ~present] == 0).all()
    assert all(i in index[i].tolist() for i in torch.nonzero(present).flatten().tolist())  # itself, as in LATTICE
    # symmetric_normalise alone: D^-1/2 S D^-1/2 of the lists given
    w = torch.tensor([[1.0, 3.0], [1.0, 1.0]])  # S = [[1, 3], [1, 1]]: degrees 4 and 2
    r = 2**0.5
    torch.testing.assert_close(symmetric_normalise(torch.tensor([[0, 1], [1, 0]]), w),
                               torch.tensor([[1 / 4, 3 / (2 * r)], [1 / 2, 1 / (r * 2)]]))  # fmt: skip


def test_general_dataset_has_the_sequential_users_items_and_targets(keys):
    """user_sample_ratio and the k-core filter as for the sequential models; the same leave-one-out targets."""
    from recbole_perpeft.data import create_dataset, data_preparation

    sampled = {**keys, "user_sample_ratio": 0.7}
    splits = {}
    for name in ("LATTICE", "FrozenMM"):
        config = build_config(name, "gen", sampled)
        dataset = create_dataset(config)
        assert isinstance(dataset, MultimodalGeneralDataset) == (name == "LATTICE")
        train, valid, test = data_preparation(config, dataset, get_model(name))
        users = dataset.field2id_token["user_id"]
        splits[name] = {
            "users": list(users), "items": list(dataset.field2id_token["item_id"]),
            "test": sorted(zip(users[test._dataset.inter_feat["user_id"].numpy()],
                               test._dataset.inter_feat["item_id"].numpy().tolist(), strict=True)),
        }  # fmt: skip
        if name == "LATTICE":
            # RecBole's general full-sort loader: it masks each user's history (training and validation items)
            assert isinstance(test, FullSortEvalDataLoader) and not test.is_sequential
            u = int(test._dataset.inter_feat["user_id"][0])
            seen = set(train._dataset.inter_feat["item_id"][train._dataset.inter_feat["user_id"] == u].tolist())
            seen |= set(valid._dataset.inter_feat["item_id"][valid._dataset.inter_feat["user_id"] == u].tolist())
            assert set(test.uid2history_item[u].tolist()) == seen and len(seen) >= 5
    assert len(splits["LATTICE"]["users"]) < 31  # the sample took some users out
    assert splits["LATTICE"] == splits["FrozenMM"]


@pytest.mark.parametrize("name", MODELS)
def test_loss_decreases_on_tiny_data(name, keys):
    config, model, train, _, test = build_model(name, "gen", keys)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    epochs = []
    for _ in range(6):
        model.train()
        total = 0.0
        for batch in train:
            loss = model.calculate_loss(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        epochs.append(total)
    assert np.isfinite(epochs).all() and epochs[-1] < 0.8 * epochs[0], epochs
    model.eval()
    interaction, _, _, _ = next(iter(test))
    scores = model.full_sort_predict(interaction)
    assert scores.shape == (len(interaction), model.n_items) and torch.isfinite(scores).all()


def test_lattice_graph_mixes_learned_and_fixed_knn_graphs(keys):
    config, model, train, _, _ = build_model("LATTICE", "gen", {**keys, "knn_k": 3, "modalities": ["text"]})
    assert model.modalities == ["text"]
    index, weight = model.graph_index, model.graph_weight
    assert index.shape == (model.n_items, 2 * 3)  # learned + fixed, 3 neighbours each
    # With lambda_coeff = 0 the graph is the learned one: the kNN graph of the mapped features.
    model.lambda_coeff = 0.0
    index, weight = model.item_graph()
    with torch.no_grad():
        mapped = model.transforms["text"](model.feature("text"))
    expected = dense(*knn_graph(mapped, 3, model.present_text))
    torch.testing.assert_close(dense(index, weight.detach()), expected, rtol=1e-5, atol=1e-6)
    # The learned graph is rebuilt on an epoch's first training batch, with gradient into the feature maps.
    model.train()
    before = model.graph_weight.clone()
    loss = model.calculate_loss(next(iter(train)))
    loss.backward()
    assert model.transforms["text"].weight.grad.abs().sum() > 0 and model.modal_weight.grad is not None
    assert not torch.equal(before, model.graph_weight)  # (lambda 0: now the learned graph alone)
    assert "graph_weight" in model.state_dict()  # checkpoints carry the graph the model was trained with


def test_bm3_needs_no_negatives(keys):
    config, model, train, _, _ = build_model("BM3", "gen", keys)
    assert config["train_neg_sample_args"]["distribution"] == "none"
    batch = next(iter(train))
    assert config["NEG_PREFIX"] + config["ITEM_ID_FIELD"] not in batch.interaction
    assert len(batch) == min(32, len(train._dataset))  # one row per training interaction, nothing added
    loss = model.calculate_loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and model.transforms["image"].weight.grad.abs().sum() > 0
