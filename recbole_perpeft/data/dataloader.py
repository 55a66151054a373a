"""Training batches of one sequence per user.

RecBole's sequential pipeline trains on every prefix of every sequence, which multiplies the
foundation-model work by the sequence length. Our models instead see each user once per epoch:
the last MAX_ITEM_LIST_LENGTH training items as input and the next item at every position as the
target (Eq. 1), with one sampled negative per position."""

from __future__ import annotations

import numpy as np
import torch
from recbole.data.dataloader.abstract_dataloader import AbstractDataLoader
from recbole.data.interaction import Interaction

TARGET_LIST = "target_item_list"
NEG_LIST = "neg_item_list"


def last_row_per_user(dataset) -> np.ndarray:
    """Index of each user's longest training prefix in RecBole's augmented train split."""
    users = dataset.inter_feat[dataset.uid_field].numpy()
    lengths = dataset.inter_feat[dataset.item_list_length_field].numpy()
    order = np.lexsort((lengths, users))  # by user, then length; the last of each user wins
    is_last = np.r_[users[order][1:] != users[order][:-1], True]
    return order[is_last]


def user_sequences(dataset) -> Interaction:
    """Per user: ``item_id_list`` (input), ``item_length`` and ``target_item_list`` (next items)."""
    feat = dataset.inter_feat[torch.from_numpy(last_row_per_user(dataset))]
    seq_field = dataset.item_id_list_field
    seq, lengths, last = feat[seq_field], feat[dataset.item_list_length_field], feat[dataset.iid_field]
    targets = torch.zeros_like(seq)
    targets[:, :-1] = seq[:, 1:]
    targets[torch.arange(len(seq)), lengths - 1] = last
    return Interaction(
        {
            dataset.uid_field: feat[dataset.uid_field],
            seq_field: seq,
            dataset.item_list_length_field: lengths,
            TARGET_LIST: targets,
        }
    )


class UserSequenceDataLoader(AbstractDataLoader):
    def __init__(self, config, dataset, sampler, shuffle=True):
        self.user_data = user_sequences(dataset)
        self.sample_size = len(self.user_data)
        self.seq_field = dataset.item_id_list_field
        super().__init__(config, dataset, sampler, shuffle=shuffle)

    def _init_batch_size_and_step(self):
        batch_size = self.config["train_batch_size"]
        self.step = batch_size
        self.set_batch_size(batch_size)

    def collate_fn(self, index):
        batch = self.user_data[torch.as_tensor(np.asarray(index), dtype=torch.long)]
        seq, targets = batch[self.seq_field], batch[TARGET_LIST]
        history = torch.cat([seq, targets], dim=1)
        batch.update(Interaction({NEG_LIST: self._sampler.sample(history, seq.shape[1])}))
        return batch
