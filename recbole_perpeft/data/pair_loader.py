"""Training batches of (user, training item) pairs, for graph backbones such as LightGCN.

Every distinct (user, item) pair of the training split is one row per epoch, with one sampled negative
that is none of the user's training items. :class:`GroupedUserItemPairDataLoader` (PerPEFT §3.3.2)
makes every batch hold pairs of users of one group and tags it with ``GROUP_ID``.

Batches carry the dataset's user id field [B], its item id field (the positive) [B] and ``NEG_LIST``
[B] (one negative per row, not [B, 1]: what a pairwise loss indexes directly); under ``loss_type:
SAMPLED_SOFTMAX`` instead the negatives shared by the batch (``SHARED_NEGATIVES``, ``SHARED_NEG_LOG_Q``,
see data/dataloader.py). ``train_windows`` does not apply: every training pair is a row already."""

from __future__ import annotations

import numpy as np
import torch
from recbole.data.dataloader.abstract_dataloader import AbstractDataLoader
from recbole.data.interaction import Interaction

from recbole_perpeft.data.dataloader import GROUP_ID, NEG_LIST, GroupBatchesMixin, negatives, shared_negative_count


def training_pairs(dataset) -> tuple[np.ndarray, np.ndarray]:
    """(users, items): every distinct (user, item) pair of the training split, sorted by user then item.

    RecBole's sequential train split holds one row per prefix (augmented), each with the prefix's last
    ``MAX_ITEM_LIST_LENGTH`` items and the next item as target; the union of the rows' item lists and
    targets is each user's whole training history (the first item is only ever in a list), repeated
    many times: hence the deduplication. A dataset without item lists gives its (user, item) rows."""
    feat = dataset.inter_feat
    users = feat[dataset.uid_field].numpy().astype(np.int64)
    items = feat[dataset.iid_field].numpy().astype(np.int64)[:, None]
    list_field = getattr(dataset, "item_id_list_field", None)
    if list_field is not None and list_field in feat.columns:
        items = np.concatenate([feat[list_field].numpy().astype(np.int64), items], axis=1)
    users = np.repeat(users, items.shape[1])
    items = items.reshape(-1)
    real = items > 0  # 0 pads the item lists
    n_items = int(dataset.item_num)
    keys = np.unique(users[real] * n_items + items[real])  # sorted: by user, then item
    return keys // n_items, keys % n_items


class UserItemPairDataLoader(AbstractDataLoader):
    """One epoch = every training pair once (shuffled with ``shuffle``), batches of ``batch_size`` rows
    (default: ``pair_batch_size``, or ``train_batch_size`` where that is unset), negatives from
    ``sampler.sample(history, 1)`` with history = the row's user's training items."""

    def __init__(self, config, dataset, sampler, shuffle=True, batch_size: int | None = None):
        self._setup_pairs(dataset, batch_size)
        self.shared_negatives = shared_negative_count(config)
        super().__init__(config, dataset, sampler, shuffle=shuffle)

    def _setup_pairs(self, dataset, batch_size: int | None) -> None:
        self.pair_users, self.pair_items = training_pairs(dataset)
        self.sample_size = len(self.pair_users)
        self.uid_field, self.iid_field = dataset.uid_field, dataset.iid_field
        # User u's items are pair_items[user_start[u]:user_start[u + 1]] (pairs are sorted by user).
        self.user_start = np.searchsorted(self.pair_users, np.arange(int(dataset.user_num) + 1))
        self.fixed_batch_size = batch_size

    def _init_batch_size_and_step(self):
        batch_size = self.fixed_batch_size or self.config["pair_batch_size"] or self.config["train_batch_size"]
        self.step = int(batch_size)
        self.set_batch_size(int(batch_size))

    def user_items(self, user: int) -> np.ndarray:
        """The training items of internal user id ``user`` (sorted)."""
        return self.pair_items[self.user_start[user] : self.user_start[user + 1]]

    def histories(self, users: np.ndarray) -> torch.Tensor:
        """[B, T] the training items of each of ``users``, 0-padded to the longest: what negatives avoid."""
        starts = self.user_start[users]
        counts = self.user_start[users + 1] - starts
        columns = np.arange(max(int(counts.max(initial=0)), 1))
        valid = columns < counts[:, None]
        index = np.where(valid, starts[:, None] + columns, 0)
        return torch.from_numpy(np.where(valid, self.pair_items[index], 0))

    def _batch(self, index, group: int | None = None) -> Interaction:
        rows = np.asarray(index, dtype=np.int64)
        users = self.pair_users[rows]
        history = None if self.shared_negatives else self.histories(users)
        drawn = negatives(self._sampler, self.shared_negatives, history, 1, group)
        if NEG_LIST in drawn:
            drawn[NEG_LIST] = drawn[NEG_LIST][:, 0]
        return Interaction(
            {self.uid_field: torch.from_numpy(users), self.iid_field: torch.from_numpy(self.pair_items[rows]), **drawn}
        )

    def collate_fn(self, index):
        return self._batch(index)

    def state_dict(self) -> dict:
        """The random state a resumed run needs to draw the same batches and negatives (see resume.py)."""
        return {"generator": self.generator.get_state(), "sampler": self._sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._sampler.load_state_dict(state["sampler"])


class GroupedUserItemPairDataLoader(GroupBatchesMixin, UserItemPairDataLoader):
    """:class:`UserItemPairDataLoader` whose batches each hold pairs of users of one group (PerPEFT §3.3.2).

    ``group_of_user[u]`` is the group of internal user id ``u`` (-1: none); every user of the training
    data needs a group. Batches carry ``GROUP_ID`` [B] (one value) and draw their negatives with
    ``sampler.sample(history, 1, group=g)`` (the group's pool with a GroupNegativeSampler). Batch order:
    :class:`GroupBatchSampler` over the pair rows, seeded from ``config["seed"]`` and the epoch."""

    def __init__(self, config, dataset, sampler, group_of_user: np.ndarray, shuffle=True,
                 batch_size: int | None = None):  # fmt: skip
        if not config["single_spec"]:
            raise ValueError("GroupedUserItemPairDataLoader does not support distributed training.")
        self._setup_pairs(dataset, batch_size)
        self.shared_negatives = shared_negative_count(config)
        group_of_user = np.asarray(group_of_user)
        if len(self.pair_users) and self.pair_users.max() >= len(group_of_user):
            raise ValueError(
                f"group_of_user has {len(group_of_user)} entries; user id {self.pair_users.max()} has none."
            )
        self.row_group = group_of_user[self.pair_users].astype(np.int64)
        ungrouped = len(np.unique(self.pair_users[self.row_group < 0]))
        if ungrouped:
            raise ValueError(f"{ungrouped} user(s) of the training data have no group (group_of_user < 0).")

        self._init_group_batches(config, dataset, sampler, shuffle)

    def collate_fn(self, index):
        groups = np.unique(self.row_group[np.asarray(index, dtype=np.int64)])
        if len(groups) != 1:
            raise ValueError(f"A batch holds pairs of groups {groups.tolist()}; expected one group.")
        group = int(groups[0])
        batch = self._batch(index, group=group)
        batch.update(Interaction({GROUP_ID: torch.full((len(index),), group, dtype=torch.long)}))
        return batch
