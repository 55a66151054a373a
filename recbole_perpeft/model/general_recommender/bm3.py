"""BM3 (Zhou et al., "Bootstrap Latent Representations for Multi-modal Recommendation", WWW 2023), written
from the paper (and read against the authors' public code, enoche/BM3, for its defaults).

Users and items get LightGCN vectors (``n_layers`` over the training split's user-item graph; an item's vector
adds its own ID embedding back), each modality's features a linear map onto the same width. A shared predictor
(one linear layer) gives the "online" view of every vector; the "target" view is the vector itself, without
gradient, perturbed by dropout (``dropout``): a bootstrapped, negative-free objective (no sampled negatives: the
training batches are plain (user, item) interactions). The loss on a batch of interactions (u, i):

- reconstruction: (1 - cos(online(u), target(i))) + (1 - cos(online(i), target(u)));
- per modality m, weighted by ``cl_weight``: alignment with the item, 1 - cos(online(m_i), target(i)), and
  masked-feature reconstruction, 1 - cos(online(m_i), target(m_i)) (items lacking m are left out of both);
- ``reg_weight`` x the mean squared norm of the batch's user and item vectors (the authors' code takes the
  norms of the whole tables; per-row terms here, so a batch split over processes sums to the same loss).

Scores are online(u) . online(i). The item features are the run's frozen foundation vectors
(multimodal_graph.frozen_item_features), fine-tuned as the authors' code does when ``train_modality_features``
is True."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from recbole.utils import InputType
from torch import nn

from recbole_perpeft.model.general_recommender.lattice import positive
from recbole_perpeft.model.multimodal_graph import GraphRecommender, present_rows


def cosine_loss(online: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 1 - F.cosine_similarity(online, target.detach(), dim=-1).mean()


class BM3(GraphRecommender):
    input_type = InputType.POINTWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.n_layers = int(config["n_layers"])
        self.dropout = positive(config, "dropout", float)
        if self.dropout >= 1:
            raise ValueError(f"dropout (of the target views) must be in [0, 1), got {self.dropout}.")
        self.reg_weight = positive(config, "reg_weight", float)
        self.cl_weight = positive(config, "cl_weight", float)
        features = self.modality_features(config, dataset, bool(config["train_modality_features"]))
        for m, f in features.items():
            self.register_buffer(f"present_{m}", present_rows(f), persistent=False)  # items having m
        self.predictor = nn.Linear(self.embedding_size, self.embedding_size)
        nn.init.xavier_normal_(self.predictor.weight)
        self.transforms = nn.ModuleDict({m: nn.Linear(f.shape[1], self.embedding_size) for m, f in features.items()})
        for layer in self.transforms.values():
            nn.init.xavier_normal_(layer.weight)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        users, items = self.lightgcn(self.n_layers)
        return users, items + self.item_id_embedding.weight

    def target(self, table: torch.Tensor) -> torch.Tensor:
        """The target view of a whole table: no gradient, dropout-perturbed. Drawn over the table, not the
        batch's rows (as the authors' code does): processes sharing a batch draw the same mask."""
        return F.dropout(table.detach(), self.dropout, training=True)

    def calculate_loss(self, interaction):
        user, item = interaction[self.USER_ID], interaction[self.ITEM_ID]
        users, items = self.forward()
        u, i = users[user], items[item]
        user_target, item_target = self.target(users)[user], self.target(items)[item]
        loss = cosine_loss(self.predictor(u), item_target) + cosine_loss(self.predictor(i), user_target)
        for m in self.modalities:
            mapped = self.transforms[m](self.feature(m))
            feature_target = self.target(mapped)[item]
            keep = getattr(self, f"present_{m}")[item]  # items lacking m have nothing to align
            if keep.any():
                online = self.predictor(mapped[item[keep]])
                alignment = cosine_loss(online, item_target[keep]) + cosine_loss(online, feature_target[keep])
                loss = loss + self.cl_weight * alignment
        return loss + self.reg_weight * (u.pow(2).sum(1) + i.pow(2).sum(1)).mean()

    def score_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        users, items = self.forward()
        return self.predictor(users), self.predictor(items)
