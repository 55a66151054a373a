"""What a backbone recommender offers the multimodal recommender (``backbone`` in YAML).

The multimodal recommender (GlobalPEFT and its descendants) owns the item side: an item's vector is
its ID embedding plus the projected multimodal vector of the item tower (under one group's adapter
for PerPEFT). A backbone owns the user side: how a batch of training data turns item vectors into
(user state, positive, negative) triples for the loss, how a user's vector is computed at evaluation
and for grouping, and which training batches it needs. SASRec (``sasrec.py``) reads each user's
sequence; LightGCN (``lightgcn.py``) propagates over the user-item graph of the training split.

A backbone registers itself by name (``@register_backbone("SASRec")``) in its own file under
``recbole_perpeft/model/backbones/``, with its hyper-parameters in
``recbole_perpeft/properties/backbone/<Name>.yaml``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class Triples:
    """What every loss reads: at N training positions, the user state, the positive and the sampled
    negative item's vector, and the positive item ids (for in-batch and sampled-softmax losses)."""

    user: torch.Tensor  # [N, H]
    pos: torch.Tensor  # [N, H]
    # [N, H]; None when the batch has no per-position negatives (loss_type SAMPLED_SOFTMAX: its negatives
    # are shared by the batch, and the model scores them in ``item_space`` or as encoded).
    neg: torch.Tensor | None
    pos_items: torch.Tensor  # [N] item ids
    extra_loss: torch.Tensor | float = 0.0  # the backbone's own term (e.g. LightGCN's L2 on the batch's embeddings)
    # In-batch candidates in the space users are scored in (None: the batch's distinct items as encoded,
    # which is that space for SASRec; LightGCN gives its propagated positives and negatives).
    candidate_items: torch.Tensor | None = None  # [C] item ids
    candidate_vectors: torch.Tensor | None = None  # [C, H]
    # Every item's vector in the space users are scored in, where the backbone computed it for this batch
    # (LightGCN: the propagated table, row i = item i); None: the encoded vectors are that space (SASRec).
    item_space: torch.Tensor | None = None  # [n_items, H]


class Backbone(nn.Module):
    """Base class; ``config`` is the run's Config, ``dataset`` the training split (a
    MultimodalSequentialDataset: both backbones train and evaluate on the same leave-one-out split)."""

    name = "?"

    def __init__(self, config, dataset):
        super().__init__()
        self.config = config

    # --- training ------------------------------------------------------------------------------------

    @classmethod
    def training_loader(cls, config, dataset, sampler, group_of_user=None, shuffle=True):
        """RecBole-style loader of training batches (``state_dict``/``load_state_dict`` for resume).
        With ``group_of_user`` ([n_users] int, -1 none) every batch holds users of one group and
        carries ``GROUP_ID``; ``sampler.sample(history, num, group=g)`` draws the negatives."""
        raise NotImplementedError

    def batch_items(self, interaction) -> torch.Tensor:
        """The item ids whose vectors :meth:`triples` needs for this batch (may hold repeats and 0). Under
        ``loss_type: SAMPLED_SOFTMAX`` batches carry no ``NEG_LIST`` (the model adds the batch's shared
        negatives to these items itself, so that each is encoded once)."""
        raise NotImplementedError

    def triples(self, interaction, items: torch.Tensor, vectors: torch.Tensor, inverse: torch.Tensor) -> Triples:
        """``items`` = unique(batch_items), ``vectors`` their vectors [U, H], ``inverse`` such that
        ``vectors[inverse]`` has batch_items' shape. Padding positions are already dropped."""
        raise NotImplementedError

    # --- evaluation and grouping -----------------------------------------------------------------------

    def user_vectors(self, interaction, table: torch.Tensor) -> torch.Tensor:
        """[B, H] for an evaluation batch, given every item's vector ``table`` [n_items, H]."""
        raise NotImplementedError

    def scoring_table(self, table: torch.Tensor) -> torch.Tensor:
        """The item representations user vectors are scored against (SASRec: the table itself)."""
        return table

    def interest_vectors(self, dataset, table: torch.Tensor, batch_size: int,
                         valid_dataset=None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """(internal user ids, [n, H] vectors) of every training user, from training data only (with
        ``valid_dataset``, its validation items too, where the backbone can): what PerPEFT's grouping clusters."""
        raise NotImplementedError
