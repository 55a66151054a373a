"""LightGCN as a backbone (He et al., SIGIR 2020; PerPEFT App. C.3.2): linear propagation over the
user-item graph of the training split.

Layer 0 is the user's own embedding (a parameter here) and the item's vector as the multimodal model
computes it (ID embedding + projected multimodal vector, under the active adapter). Each layer
multiplies by the symmetric normalised adjacency D^-1/2 A D^-1/2 over users + items; the final vector
is the mean of layers 0..K. Trained on (user, training item, negative) rows (data/pair_loader.py) with
an L2 regulariser on the batch's layer-0 vectors, as RecBole's LightGCN does.

Evaluation uses only the user id of each row of RecBole's sequential full-sort loaders, so SASRec and
LightGCN are scored on the same leave-one-out split. RecBole's own LightGCN is not reused: it builds
its adjacency through scipy's ``dok_matrix._update``, gone in SciPy >= 1.13; this one is torch/numpy."""

from __future__ import annotations

import numpy as np
import torch
from recbole.model.loss import EmbLoss
from torch import nn

from recbole_perpeft.data.dataloader import NEG_LIST
from recbole_perpeft.data.pair_loader import GroupedUserItemPairDataLoader, UserItemPairDataLoader, training_pairs
from recbole_perpeft.model.backbones import backbone_setting, register_backbone
from recbole_perpeft.model.backbones.base import Backbone, Triples

NAME = "LightGCN"


def normalized_adjacency(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> torch.Tensor:
    """D^-1/2 A D^-1/2 as a coalesced sparse COO tensor [n_users + n_items, same]: node u is user u, node
    n_users + i is item i, A holds both directions of every distinct (user, item) edge given. A node
    without edges (padding user/item 0, a user or item absent from training) has an all-zero row."""
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    keys = np.unique(users * n_items + items)  # one edge per pair, however often it is listed
    users, items = keys // n_items, keys % n_items
    rows = np.concatenate([users, n_users + items])
    cols = np.concatenate([n_users + items, users])
    n_nodes = n_users + n_items
    degree = np.bincount(rows, minlength=n_nodes).astype(np.float64)
    inv_sqrt = np.zeros(n_nodes)
    inv_sqrt[degree > 0] = degree[degree > 0] ** -0.5
    values = inv_sqrt[rows] * inv_sqrt[cols]
    index = torch.from_numpy(np.stack([rows, cols]))
    # Built once per run: checking the indices costs nothing that matters and names a bad graph early.
    return torch.sparse_coo_tensor(index, torch.from_numpy(values).float(), (n_nodes, n_nodes),
                                   check_invariants=True).coalesce()  # fmt: skip


# SASRec window keys -> the value that means nothing to LightGCN (what its pairs are anyway).
SASREC_ONLY_KEYS = {"loss_positions": "all", "train_windows": "last"}


@register_backbone(NAME)
class LightGCNBackbone(Backbone):
    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.USER_ID, self.ITEM_ID = config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]
        self.n_users, self.n_items = int(dataset.user_num), int(dataset.item_num)
        self.n_layers = int(backbone_setting(config, NAME, "n_gcn_layers"))
        self.reg_weight = float(backbone_setting(config, NAME, "reg_weight") or 0.0)
        if self.n_layers < 0:
            raise ValueError(f"n_gcn_layers must be >= 0, got {self.n_layers}.")
        # A SASRec-window key asked for here would be ignored, and a table row would carry a setting it did
        # not train with: refused. The neutral values are what LightGCN's pairs amount to anyway.
        for key, neutral in SASREC_ONLY_KEYS.items():
            if str(config[key] or neutral).lower() != neutral:
                raise ValueError(f"{key}={config[key]!r} applies to the SASRec backbone's windows; LightGCN trains "
                                 f"on every (user, training item) pair. Drop the key (or set {key}: {neutral}) "
                                 "for backbone: LightGCN.")  # fmt: skip
        self.user_embedding = nn.Embedding(self.n_users, config["hidden_size"], padding_idx=0)
        # The scale of the item ID embeddings (GlobalPEFT's normal(0, initializer_range)), so that users
        # and items start alike in the layer-0 mix.
        nn.init.normal_(self.user_embedding.weight, std=config["initializer_range"])
        with torch.no_grad():
            self.user_embedding.weight[0].zero_()
        users, items = training_pairs(dataset)
        # Not in checkpoints: it is rebuilt from the training split, which a checkpoint is used with anyway.
        self.register_buffer("adjacency", normalized_adjacency(users, items, self.n_users, self.n_items),
                             persistent=False)  # fmt: skip
        self.emb_loss = EmbLoss()
        # Propagations of this evaluation, by item table: {id(table): (table, version, users, items)}.
        self._propagated: dict[int, tuple] = {}

    # --- propagation -----------------------------------------------------------------------------------

    def propagate(self, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(users [n_users, H], items [n_items, H]): the mean of layers 0..n_gcn_layers, layer 0 being
        the user embeddings and ``table`` (every item's vector, row i = item i)."""
        if table.shape[0] != self.n_items:
            raise ValueError(f"LightGCN propagates every item: the table has {table.shape[0]} rows, "
                             f"the graph {self.n_items} items.")  # fmt: skip
        x = torch.cat([self.user_embedding.weight.to(table.dtype), table])
        adjacency = self.adjacency if self.adjacency.dtype == x.dtype else self.adjacency.to(x.dtype)
        total = x
        for _ in range(self.n_layers):
            x = torch.sparse.mm(adjacency, x)
            total = total + x
        final = total / (self.n_layers + 1)
        return final[: self.n_users], final[self.n_users :]

    def propagated(self, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`propagate`; while not training computed once per table (without grad) and reused, since
        evaluation asks for users and items every batch. The cache goes on every train()/eval() call."""
        if self.training:
            return self.propagate(table)
        cached = self._propagated.get(id(table))
        # The entry holds the table itself, so the id cannot be reused; _version catches in-place edits.
        if cached is None or cached[0] is not table or cached[1] != table._version:
            with torch.no_grad():
                cached = (table, table._version, *self.propagate(table))
            self._propagated[id(table)] = cached
        return cached[2], cached[3]

    def train(self, mode: bool = True):
        self._propagated = {}  # parameters (or the mode) change: propagations are stale
        return super().train(mode)

    # --- training ------------------------------------------------------------------------------------

    @classmethod
    def training_loader(cls, config, dataset, sampler, group_of_user=None, shuffle=True):
        """Every (user, training item) pair once per epoch, ``pair_batch_size`` per batch (data/pair_loader.py)."""
        batch_size = backbone_setting(config, NAME, "pair_batch_size") or config["train_batch_size"]
        if group_of_user is None:
            return UserItemPairDataLoader(config, dataset, sampler, shuffle=shuffle, batch_size=batch_size)
        return GroupedUserItemPairDataLoader(config, dataset, sampler, group_of_user, shuffle=shuffle,
                                             batch_size=batch_size)  # fmt: skip

    def batch_items(self, interaction) -> torch.Tensor:
        # Propagation needs every item's layer-0 vector, so every step computes the whole item table: with
        # a PEFT adapter inside the foundation model that is a foundation forward (and backward) over all
        # items per step, costly; with side networks over cached states it is cheap.
        return torch.arange(self.n_items, device=interaction[self.USER_ID].device)

    def triples(self, interaction, items, vectors, inverse) -> Triples:
        """One triple per row: propagated user, positive and negative; ``extra_loss`` = reg_weight x
        RecBole's EmbLoss (squared L2 / 2, per row) of their layer-0 vectors. Without per-row negatives
        (SAMPLED_SOFTMAX) the pair is (user, positive), regularised alike, and the shared negatives are
        scored in ``item_space``: the propagated table."""
        table = vectors[inverse]  # batch_items is arange(n_items): row i is item i
        users_all, items_all = self.propagate(table)
        user, pos = interaction[self.USER_ID], interaction[self.ITEM_ID]
        # [B] from the pair loader ([B, 1] accepted too)
        neg = interaction[NEG_LIST].reshape(-1) if NEG_LIST in interaction else None
        extra = 0.0
        if self.reg_weight:
            ego = [self.user_embedding(user), table[pos]] + ([] if neg is None else [table[neg]])
            extra = self.reg_weight * self.emb_loss(*ego, require_pow=True).squeeze()
        # In-batch candidates (loss_type INBATCH), propagated.
        candidates = torch.unique(pos if neg is None else torch.cat([pos, neg]))
        return Triples(user=users_all[user], pos=items_all[pos], neg=None if neg is None else items_all[neg],
                       pos_items=pos, extra_loss=extra, candidate_items=candidates,
                       candidate_vectors=items_all[candidates], item_space=items_all)  # fmt: skip

    # --- evaluation and grouping -----------------------------------------------------------------------

    def user_vectors(self, interaction, table: torch.Tensor) -> torch.Tensor:
        return self.propagated(table)[0][interaction[self.USER_ID]]

    def scoring_table(self, table: torch.Tensor) -> torch.Tensor:
        return self.propagated(table)[1]

    def interest_vectors(self, dataset, table: torch.Tensor, batch_size: int,
                         valid_dataset=None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Propagated vectors of the users of the training split (one whole-graph propagation, so
        ``batch_size`` is unused), in eval mode (the mode is restored after)."""
        if valid_dataset is not None:
            raise ValueError("grouping_sequence: train_valid reads a sequence's last position; LightGCN's user vector "
                             "comes from the training graph only. Set grouping_sequence: train.")
        user_ids = np.unique(training_pairs(dataset)[0])
        was_training = self.training
        self.eval()
        try:
            users_all = self.propagated(table)[0]
            vectors = users_all[torch.from_numpy(user_ids).to(users_all.device)].cpu().numpy()
        finally:
            self.train(was_training)
        return user_ids, vectors
