"""SASRec as a backbone: a causal Transformer over each user's item sequence (paper §3.1).

Exactly what GlobalPEFT inlined before backbones existed: trained on sequence windows (one per user, or
every window with ``train_windows: all``) with the next item as target at every position (Eq. 1), the
user vector is the encoder's output at the user's last position. The encoder (``backbone.encoder``, a
:class:`SASRecEncoder`, or the official code's pre-LN one with ``sasrec_variant: official``) reads its
sizes from the model's keys (hidden_size, n_layers, n_heads, ... in
properties/model/GlobalPEFT.yaml)."""

from __future__ import annotations

import numpy as np
import torch
from recbole.model.abstract_recommender import SequentialRecommender

from recbole_perpeft.config_values import choice
from recbole_perpeft.data.dataloader import (
    NEG_LIST,
    TARGET_LIST,
    GroupedUserSequenceDataLoader,
    UserSequenceDataLoader,
    user_sequences,
)
from recbole_perpeft.model.backbones import register_backbone
from recbole_perpeft.model.backbones.base import Backbone, Triples
from recbole_perpeft.model.sequence_encoder import build_sequence_encoder


def causal_attention_mask(item_seq: torch.Tensor) -> torch.Tensor:
    """RecBole's left-to-right mask over non-padding positions ([B, 1, L, L], 0 or -10000). The method
    uses nothing of its instance, so RecBole's own code is called rather than re-derived."""
    return SequentialRecommender.get_attention_mask(None, item_seq)


def gather_indexes(output: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``output[b, index[b]]`` for each row b: RecBole's SequentialRecommender.gather_indexes."""
    return SequentialRecommender.gather_indexes(None, output, index)


def last_windows(full: torch.Tensor, n_full: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([n, max_len] items, lengths): the last ``max_len`` of each row's first ``n_full`` items, left-aligned."""
    start = (n_full - max_len).clamp(min=0)
    index = start.unsqueeze(1) + torch.arange(max_len)
    valid = index < n_full.unsqueeze(1)
    return full.gather(1, index.clamp(max=full.shape[1] - 1)) * valid, n_full.clamp(max=max_len)


def training_histories(train_dataset, max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(user ids, [n, max_len] items, lengths): each user's last ``max_len`` training items, oldest first
    and left-aligned as RecBole's item lists are (moved here from two_stage.py)."""
    users = user_sequences(train_dataset)
    seq = users[train_dataset.item_id_list_field]
    lengths = users[train_dataset.item_list_length_field]
    full = torch.cat([seq[:, :1], users[TARGET_LIST]], dim=1)  # first item + the next items
    return (users[train_dataset.uid_field], *last_windows(full, lengths + 1, max_len))


def with_validation_items(histories: tuple, valid_dataset, max_len: int) -> tuple:
    """``training_histories`` with each user's validation item appended (the last ``max_len`` kept): the
    official code's grouping sequence. Users without a validation row keep their training sequence."""
    user_ids, items, lengths = histories
    feat = valid_dataset.inter_feat
    seq, n = feat[valid_dataset.item_id_list_field], feat[valid_dataset.item_list_length_field]
    full = torch.cat([seq, torch.zeros_like(seq[:, :1])], dim=1)
    full[torch.arange(len(full)), n] = feat[valid_dataset.iid_field]  # the item after the history
    valid_items, valid_lengths = last_windows(full, n + 1, max_len)
    row_of = {int(u): i for i, u in enumerate(user_ids)}
    rows = torch.tensor([row_of.get(int(u), -1) for u in feat[valid_dataset.uid_field]], dtype=torch.long)
    known = rows >= 0
    items, lengths = items.clone(), lengths.clone()
    items[rows[known]], lengths[rows[known]] = valid_items[known], valid_lengths[known]
    return user_ids, items, lengths


LOSS_POSITIONS = ("all", "last")


def last_target_only(target: torch.Tensor) -> torch.Tensor:
    """[B, L] target mask -> the same mask with only each row's last target kept (rows without one stay
    empty): RecBole SASRec's one target per training sequence."""
    last = target.long().cumsum(1).argmax(1)  # the first position of the row's final count: its last target
    only = torch.zeros_like(target)
    only[torch.arange(target.shape[0], device=target.device), last] = True
    return target & only


@register_backbone("SASRec")
class SASRecBackbone(Backbone):
    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.ITEM_SEQ = config["ITEM_ID_FIELD"] + config["LIST_SUFFIX"]
        self.ITEM_SEQ_LEN = config["ITEM_LIST_LENGTH_FIELD"]
        self.max_seq_length = config["MAX_ITEM_LIST_LENGTH"]
        self.initializer_range = config["initializer_range"]
        positions = str(config["loss_positions"] or "all").lower()
        self.loss_positions = choice(positions, LOSS_POSITIONS, "loss_positions", "(properties/model/GlobalPEFT.yaml)",
                                     given=config["loss_positions"])  # fmt: skip
        self.encoder = build_sequence_encoder(config, self.max_seq_length)  # sasrec_variant: recbole | official

    # --- training ------------------------------------------------------------------------------------

    @classmethod
    def training_loader(cls, config, dataset, sampler, group_of_user=None, shuffle=True):
        """Sequence windows (``train_windows``), a negative at every position or shared ones (dataloader.py)."""
        if group_of_user is None:
            return UserSequenceDataLoader(config, dataset, sampler, shuffle=shuffle)
        return GroupedUserSequenceDataLoader(config, dataset, sampler, group_of_user, shuffle=shuffle)

    def batch_items(self, interaction) -> torch.Tensor:
        """[3, B, L]: the input sequence, the next item and the sampled negative at every position ([2, B, L]
        without per-position negatives: SAMPLED_SOFTMAX)."""
        fields = [self.ITEM_SEQ, TARGET_LIST] + ([NEG_LIST] if NEG_LIST in interaction else [])
        return torch.stack([interaction[field] for field in fields])

    def triples(self, interaction, items, vectors, inverse) -> Triples:
        seq, pos = interaction[self.ITEM_SEQ], interaction[TARGET_LIST]
        emb = vectors[inverse]  # [3, B, L, H] (or [2, B, L, H])
        output = self.encode(emb[0], seq)
        target = self.target_mask(pos)
        neg = emb[2][target] if len(emb) > 2 else None
        return Triples(user=output[target], pos=emb[1][target], neg=neg, pos_items=pos[target])

    def target_mask(self, targets: torch.Tensor) -> torch.Tensor:
        """[B, L] next items (0: padding) -> the positions the loss reads (``loss_positions``). The
        personalisation baselines, which lay targets out their own way, call it too."""
        target = targets > 0
        return last_target_only(target) if self.loss_positions == "last" else target

    # --- the encoder -----------------------------------------------------------------------------------

    def encode(self, item_emb: torch.Tensor, item_seq: torch.Tensor) -> torch.Tensor:
        """[B, L, H] states at every position of the ``item_seq`` [B, L] sequences, given their item
        vectors ``item_emb`` [B, L, H] (the personalisation baselines call it directly)."""
        return self.encoder(item_emb, causal_attention_mask(item_seq))

    def last_states(self, table: torch.Tensor, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        """[B, H] the state at each sequence's last item (position item_seq_len - 1)."""
        return gather_indexes(self.encode(table[item_seq], item_seq), item_seq_len - 1)

    # --- evaluation and grouping -----------------------------------------------------------------------

    def user_vectors(self, interaction, table: torch.Tensor) -> torch.Tensor:
        return self.last_states(table, interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])

    def interest_vectors(self, dataset, table: torch.Tensor, batch_size: int,
                         valid_dataset=None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """The state after each user's last ``max_seq_length`` training items (no valid/test item; with
        ``valid_dataset``, the validation item too: ``grouping_sequence: train_valid``), in eval mode (no
        dropout; the mode is restored after), ``batch_size`` users at a time."""
        histories = training_histories(dataset, self.max_seq_length)
        if valid_dataset is not None:
            histories = with_validation_items(histories, valid_dataset, self.max_seq_length)
        user_ids, histories, lengths = histories
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                rows = [
                    self.last_states(table, seq.to(table.device), n.to(table.device)).cpu()
                    for seq, n in zip(histories.split(batch_size), lengths.split(batch_size), strict=True)
                ]
        finally:
            self.train(was_training)
        width = table.shape[1]
        vectors = torch.cat(rows) if rows else torch.zeros(0, width)
        return user_ids.numpy(), vectors.numpy()
