"""LATTICE (Zhang et al., "Mining Latent Structures for Multimedia Recommendation", ACM MM 2021), written
from the paper (and read against the authors' public code, CRIPAC-DIG/LATTICE, for its defaults).

Per modality m, an item-item kNN graph from the raw features (fixed: S^m) and one from the features after a
learned linear map (learned: A^m), each kNN-sparsified (``knn_k`` neighbours) and symmetric-normalised
(multimodal_graph.knn_graph). The modalities are mixed by softmax weights, the learned graph with the fixed
one (``lambda_coeff`` of the fixed: the paper's skip connection), and ``n_item_layers`` graph convolutions over
it turn the item ID embeddings into structure-aware item vectors h. The collaborative backbone is LightGCN
(``n_ui_layers``) over the training split's user-item graph; an item's final vector is its LightGCN vector plus
h/||h||; scores are dot products; the loss is BPR with an L2 term on the batch's vectors (``reg_weight``).

As in the authors' code, the learned graph is rebuilt once per epoch, on its first training batch (whose loss
back-propagates through it into the feature maps and modality weights), then held fixed for the epoch and
for evaluation. It is kept as persistent buffers, so a checkpoint (the best one that the test loads, or the
last one that a resume continues from) carries the graph it was trained with.

The item features are the run's frozen foundation vectors (multimodal_graph.frozen_item_features), fine-tuned
as the authors' code does when ``train_modality_features`` is True."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from recbole.utils import InputType
from torch import nn

from recbole_perpeft.model.multimodal_graph import (
    GraphRecommender,
    knn_graph,
    present_rows,
    propagate_items,
    symmetric_normalise,
)


def positive(config, key: str, kind=int):
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (kind is int and value < 1):
        raise ValueError(f"{key} must be a {'positive integer' if kind is int else 'number >= 0'}, got {value!r}.")
    return kind(value)


class LATTICE(GraphRecommender):
    input_type = InputType.PAIRWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.knn_k = positive(config, "knn_k")
        self.lambda_coeff = positive(config, "lambda_coeff", float)
        if self.lambda_coeff > 1:
            raise ValueError(f"lambda_coeff (the fixed graph's share) must be in [0, 1], got {self.lambda_coeff}.")
        self.n_item_layers = positive(config, "n_item_layers")
        self.n_ui_layers = int(config["n_ui_layers"])
        self.reg_weight = positive(config, "reg_weight", float)
        features = self.modality_features(config, dataset, bool(config["train_modality_features"]))
        feat_dim = int(config["feat_embed_dim"])
        self.transforms = nn.ModuleDict({m: nn.Linear(f.shape[1], feat_dim) for m, f in features.items()})
        self.modal_weight = nn.Parameter(torch.zeros(len(features)))  # softmax: equal shares at the start
        # The fixed graphs (from the raw features, never learned): rebuilt from the cache, not checkpointed.
        for m, f in features.items():
            self.register_buffer(f"present_{m}", present_rows(f), persistent=False)  # items having m
            index, weight = knn_graph(f, self.knn_k, present_rows(f))
            self.register_buffer(f"fixed_index_{m}", index, persistent=False)
            self.register_buffer(f"fixed_weight_{m}", weight, persistent=False)
        with torch.no_grad():
            index, weight = self.item_graph()
        self.register_buffer("graph_index", index)
        self.register_buffer("graph_weight", weight)
        self._rebuild = True  # set by train(): the next training batch rebuilds the learned graph

    def item_graph(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixed item-item graph as neighbour lists [n_items, 2 x modalities x k]: (1 - lambda) x the
        learned graph (the modalities' kNN graphs of the mapped features, mixed, then normalised) + lambda x
        the fixed graph (the modalities' normalised kNN graphs of the raw features, mixed)."""
        shares = torch.softmax(self.modal_weight, 0)
        learned_index, learned_weight, fixed_weight = [], [], []
        for share, m in zip(shares, self.modalities, strict=True):
            mapped, present = self.transforms[m](self.feature(m)), getattr(self, f"present_{m}")
            index, _ = knn_graph(mapped.detach(), self.knn_k, present)  # neighbours: no gradient
            similarity = (F.normalize(mapped[index], dim=2) * F.normalize(mapped, dim=1).unsqueeze(1)).sum(2)
            learned_index.append(index)
            learned_weight.append(share * similarity.clamp_min(0) * present.unsqueeze(1))
            fixed_weight.append(share * getattr(self, f"fixed_weight_{m}"))
        learned = symmetric_normalise(torch.cat(learned_index, 1), torch.cat(learned_weight, 1))
        fixed_index = torch.cat([getattr(self, f"fixed_index_{m}") for m in self.modalities], 1)
        index = torch.cat([torch.cat(learned_index, 1), fixed_index], 1)
        weight = torch.cat([(1 - self.lambda_coeff) * learned, self.lambda_coeff * torch.cat(fixed_weight, 1)], 1)
        return index, weight

    def train(self, mode: bool = True):
        self._rebuild = self._rebuild or mode  # a new epoch starts
        return super().train(mode)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and self._rebuild:
            index, weight = self.item_graph()  # this batch's loss reaches the maps and weights through it
            self.graph_index.copy_(index)
            self.graph_weight.copy_(weight.detach())
            self._rebuild = False
        else:
            index, weight = self.graph_index, self.graph_weight
        h = self.item_id_embedding.weight
        for _ in range(self.n_item_layers):
            h = propagate_items(index, weight, h)
        users, items = self.lightgcn(self.n_ui_layers)
        return users, items + F.normalize(h, dim=1)

    def calculate_loss(self, interaction):
        users, items = self.forward()
        u = users[interaction[self.USER_ID]]
        pos = items[interaction[self.ITEM_ID]]
        neg = items[interaction[self.NEG_ITEM_ID]]
        bpr = -F.logsigmoid((u * pos).sum(1) - (u * neg).sum(1)).mean()
        reg = (u.pow(2).sum(1) + pos.pow(2).sum(1) + neg.pow(2).sum(1)).mean() / 2
        return bpr + self.reg_weight * reg

    def score_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward()
