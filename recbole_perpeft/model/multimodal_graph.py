"""Building blocks of the non-sequential multimodal baselines (LATTICE, BM3; model/general_recommender/).

- :func:`frozen_item_features`: every item's vector per modality from the run's frozen foundation model
  (MiniLM + EfficientNet-Lite0, or CLIP), the very cache the sequential models read (the item tower's
  FROZEN family, adapters/frozen.py), so a comparison isolates the recommender, not the features. The
  foundation's settings are FrozenMM's (its property files) under whatever the run sets
  (:func:`feature_settings`): LATTICE and BM3 read the vectors FrozenMM reads, from one cache.
- :func:`knn_graph`: a k-nearest-neighbour item-item graph from cosine similarity, symmetric-normalised
  (D^-1/2 S D^-1/2), held as neighbour lists ([n, k] indices and weights) rather than a sparse matrix: every
  row has exactly k entries, the weights stay differentiable (LATTICE learns its graph through them), and
  rows are computed in chunks, so no [n, n] matrix is ever held. Hand-written: neither RecBole nor
  torch_geometric (not a dependency here) ships a kNN-sparsified, normalised, differentiable item graph.
- :class:`GraphRecommender`: RecBole's GeneralRecommender with user and item ID embeddings, the training
  split's user-item graph (backbones/lightgcn.py's normalised adjacency) and LightGCN propagation over it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from recbole.model.abstract_recommender import GeneralRecommender
from torch import nn

from recbole_perpeft.model.backbones.lightgcn import normalized_adjacency
from recbole_perpeft.property_files import PROPERTIES_DIR

SIMILARITY_CHUNK = 1024  # rows of the [chunk, n] similarity block computed at once
# Where the foundation model's settings (foundation_model, text_max_length, image_size, ...) are declared: the
# model files of FrozenMM, whose item vectors are the frozen foundation's as here.
FEATURE_SETTINGS_FILES = ("GlobalPEFT.yaml", "FrozenMM.yaml")


class Settings(dict):
    """A plain mapping read as a RecBole Config is: a key nobody set reads None."""

    def __missing__(self, key):
        return None


def feature_settings(config) -> Settings:
    """FrozenMM's foundation settings (:data:`FEATURE_SETTINGS_FILES`), overlaid by every key the run sets."""
    settings = Settings()
    loader = getattr(config, "yaml_loader", yaml.SafeLoader)  # RecBole's reads 1e-5 as a number too
    for name in FEATURE_SETTINGS_FILES:
        settings.update(yaml.load((PROPERTIES_DIR / "model" / name).read_text(encoding="utf-8"), Loader=loader) or {})
    given = getattr(config, "final_config_dict", config)
    settings.update({key: value for key, value in given.items() if value is not None or key not in settings})
    return settings


def frozen_item_features(config, dataset) -> dict[str, torch.Tensor]:
    """{modality: [n_items, width]} from the frozen foundation model (cached on disk by the item tower);
    rows of items without the modality (and the padding item 0) are zero, as :func:`knn_graph` expects."""
    from recbole_perpeft.model.item_tower import ItemTower  # (the encoders are imported only here)

    tower = ItemTower(feature_settings(config), dataset, adapt=False)
    features = {}
    for modality in tower.modalities:
        has = tower.has(modality).clone()
        has[0] = False
        features[modality] = getattr(tower.family.features, modality).float() * has.unsqueeze(1)
    return features


def present_rows(features: torch.Tensor) -> torch.Tensor:
    """[n] bool: the rows with a vector (items that have the modality)."""
    return features.abs().sum(1) > 0


def symmetric_normalise(index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """D^-1/2 S D^-1/2 for neighbour lists (row i: S[i, index[i, j]] = weight[i, j]): D is S's row sums,
    each weight becomes d_i^-1/2 w_ij d_j^-1/2; a row summing to 0 gets weight 0 (no neighbours)."""
    degree = weight.sum(1)
    inv_sqrt = torch.where(degree > 0, degree.clamp_min(1e-12).rsqrt(), torch.zeros_like(degree))
    return inv_sqrt.unsqueeze(1) * weight * inv_sqrt[index]


def knn_graph(features: torch.Tensor, k: int, present: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most cosine-similar items of each item (itself included, as in LATTICE), as neighbour lists
    ([n, k] indices, [n, k] symmetric-normalised weights). Only ``present`` items (default: non-zero rows)
    are neighbours or have any; similarities below 0 are cut to 0, so every degree is >= 0. Differentiable
    in the weights."""
    n = features.shape[0]
    present = present_rows(features) if present is None else present
    k = max(1, min(int(k), int(present.sum())))
    unit = F.normalize(features, dim=1)
    absent = torch.where(present, 0.0, float("-inf")).to(unit.dtype)
    indices, weights = [], []
    for start in range(0, n, SIMILARITY_CHUNK):
        block = unit[start : start + SIMILARITY_CHUNK] @ unit.T + absent  # absent items are never chosen
        values, index = torch.topk(block, k, dim=1)
        indices.append(index)
        weights.append(values.clamp_min(0) * present[start : start + SIMILARITY_CHUNK].unsqueeze(1))
    index, weight = torch.cat(indices), torch.cat(weights)
    return index, symmetric_normalise(index, weight)


def propagate_items(index: torch.Tensor, weight: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """One graph convolution over neighbour lists: row i = sum_j weight[i, j] * table[index[i, j]]."""
    return (weight.unsqueeze(2) * table[index]).sum(1)


class GraphRecommender(GeneralRecommender):
    """User and item ID embeddings, the training interactions' normalised user-item graph and LightGCN
    propagation (layer 0 = the embeddings; output = mean of layers 0..L). Full-sort scores come from
    ``score_tables`` (users [n_users, d], items [n_items, d]), computed once per evaluation and cached:
    RecBole's general full-sort loader asks for a few users per batch."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.embedding_size = int(config["embedding_size"])
        self.user_embedding = nn.Embedding(self.n_users, self.embedding_size)
        self.item_id_embedding = nn.Embedding(self.n_items, self.embedding_size)
        nn.init.xavier_uniform_(self.user_embedding.weight)
        nn.init.xavier_uniform_(self.item_id_embedding.weight)
        users = dataset.inter_feat[self.USER_ID].numpy()
        items = dataset.inter_feat[self.ITEM_ID].numpy()
        # Not in checkpoints: rebuilt from the training split, which a checkpoint is always used with.
        self.register_buffer("adjacency", normalized_adjacency(np.asarray(users), np.asarray(items), self.n_users,
                                                               self.n_items), persistent=False)  # fmt: skip
        self._tables = None  # (users, items) of the current evaluation

    def modality_features(self, config, dataset, trainable: bool) -> dict[str, torch.Tensor]:
        """The frozen features as buffers (not checkpointed: read back from the cache) or, ``trainable``,
        as parameters the model fine-tunes (what both papers' code does with the features it is given)."""
        features = frozen_item_features(config, dataset)
        if trainable:
            self.features = nn.ParameterDict({m: nn.Parameter(f) for m, f in features.items()})
        else:
            self.features = nn.Module()
            for modality, table in features.items():
                self.features.register_buffer(modality, table, persistent=False)
        self.modalities = list(features)
        return features

    def feature(self, modality: str) -> torch.Tensor:
        if isinstance(self.features, nn.ParameterDict):
            return self.features[modality]
        return getattr(self.features, modality)

    def lightgcn(self, n_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([self.user_embedding.weight, self.item_id_embedding.weight])
        total = x
        for _ in range(n_layers):
            x = torch.sparse.mm(self.adjacency, x)
            total = total + x
        final = total / (n_layers + 1)
        return final[: self.n_users], final[self.n_users :]

    def score_tables(self) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - each model's own
        raise NotImplementedError

    def train(self, mode: bool = True):
        self._tables = None  # the parameters change (or were loaded): the cached tables are stale
        return super().train(mode)

    def full_sort_predict(self, interaction):
        if self._tables is None or self.training:
            with torch.no_grad():
                self._tables = self.score_tables()
        users, items = self._tables
        return users[interaction[self.USER_ID]] @ items.T

    def predict(self, interaction):
        users, items = self.score_tables()
        return (users[interaction[self.USER_ID]] * items[interaction[self.ITEM_ID]]).sum(1)
