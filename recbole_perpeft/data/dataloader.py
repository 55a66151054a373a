"""Training batches of user sequence windows.

RecBole's sequential pipeline trains on every prefix of every sequence, which multiplies the
foundation-model work by the sequence length. Our models instead train on windows: a window is
MAX_ITEM_LIST_LENGTH consecutive training items as input and the next item at every position as the
target (Eq. 1). ``train_windows: last`` (default) gives each user one window per epoch, its last
training items; ``all`` every window of the history, from the last one back by ``train_window_stride``
(default MAX_ITEM_LIST_LENGTH: the windows' targets do not overlap), the earliest ones shorter.

The loss decides the negatives: one sampled negative per position (``NEG_LIST``, Eq. 1 / BPR), or,
under ``loss_type: SAMPLED_SOFTMAX``, ``sampled_softmax_negatives`` items shared by the whole batch
(``SHARED_NEGATIVES`` [1, K] and their log-probabilities ``SHARED_NEG_LOG_Q`` [1, K]: one row, so that
``len(batch)`` stays the number of windows). Both come from the sampler's seeded generator (resume). A
sampled negative avoids the window's items, or (``negative_exclude: history``) the user's whole training history.

:class:`GroupedUserSequenceDataLoader` (PerPEFT §3.3.2) makes every batch hold windows of users of one
group, so a batch trains one group's PEFT modules, and tags it with ``GROUP_ID``."""

from __future__ import annotations

import numpy as np
import torch
from recbole.data.dataloader.abstract_dataloader import AbstractDataLoader
from recbole.data.interaction import Interaction
from recbole.data.transform import construct_transform
from recbole.utils import ModelType

from recbole_perpeft.config_values import choice
from recbole_perpeft.data.history_mask import negative_history, with_whole_history

TARGET_LIST = "target_item_list"
NEG_LIST = "neg_item_list"
GROUP_ID = "group_id"
SHARED_NEGATIVES = "shared_neg_items"
SHARED_NEG_LOG_Q = "shared_neg_log_q"
SAMPLED_SOFTMAX = "SAMPLED_SOFTMAX"  # the loss_type whose batches carry shared negatives
TRAIN_WINDOWS = ("last", "all")


def last_row_per_user(dataset) -> np.ndarray:
    """Index of each user's longest training prefix in RecBole's augmented train split."""
    users = dataset.inter_feat[dataset.uid_field].numpy()
    lengths = dataset.inter_feat[dataset.item_list_length_field].numpy()
    order = np.lexsort((lengths, users))  # by user, then length; the last of each user wins
    is_last = np.r_[users[order][1:] != users[order][:-1], True]
    return order[is_last]


def prefix_ends(dataset) -> np.ndarray:
    """[rows] for each row of RecBole's augmented train split, how many of its user's training items
    precede its target (1 for the user's first row). RecBole writes a user's rows in time order, one per
    target (``SequentialDataset.data_augmentation``), and the leave-one-out split keeps that order; the
    item list lengths (the prefix, cut at MAX_ITEM_LIST_LENGTH) are checked against it."""
    users = dataset.inter_feat[dataset.uid_field].numpy()
    lengths = dataset.inter_feat[dataset.item_list_length_field].numpy()
    order = np.argsort(users, kind="stable")  # by user, each user's rows in their (time) order
    first = np.r_[True, users[order][1:] != users[order][:-1]]
    starts = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
    ends = np.empty(len(order), dtype=np.int64)
    ends[order] = np.arange(len(order)) - starts + 1
    max_len = dataset.field2seqlen[dataset.item_id_list_field]
    if not np.array_equal(np.minimum(ends, max_len), lengths):
        raise RuntimeError("The train split's rows are not every prefix of each user in time order, as RecBole's "
                           "sequential data augmentation writes them: training windows cannot be read from it.")
    return ends


def window_rows(dataset, stride: int) -> np.ndarray:
    """Rows of the augmented train split that are training windows under ``train_windows: all``: per user
    the row of its last training item and every ``stride``-th row before it, by user then time."""
    users = dataset.inter_feat[dataset.uid_field].numpy()
    ends = prefix_ends(dataset)
    last = np.zeros(int(users.max(initial=0)) + 1, dtype=np.int64)
    np.maximum.at(last, users, ends)
    chosen = np.flatnonzero((last[users] - ends) % stride == 0)
    return chosen[np.lexsort((ends[chosen], users[chosen]))]


def sequences_of_rows(dataset, rows: np.ndarray) -> Interaction:
    """Per row of the augmented train split: ``item_id_list`` (input), ``item_length`` and
    ``target_item_list`` (the next item at every position)."""
    feat = dataset.inter_feat[torch.from_numpy(np.asarray(rows, dtype=np.int64))]
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


def user_sequences(dataset) -> Interaction:
    """Per user its last window: ``item_id_list`` (input), ``item_length`` and ``target_item_list`` (next items)."""
    return sequences_of_rows(dataset, last_row_per_user(dataset))


def training_windows(config, dataset) -> Interaction:
    """The windows an epoch trains on (``train_windows``, ``train_window_stride``), as :func:`sequences_of_rows`."""
    mode = choice(str(config["train_windows"] or "last").lower(), TRAIN_WINDOWS, "train_windows",
                  "(last: each user's last MAX_ITEM_LIST_LENGTH training items; all: every window)",
                  given=config["train_windows"])  # fmt: skip
    if mode == "last":
        return user_sequences(dataset)
    stride = config["train_window_stride"]
    if stride is None:
        stride = config["MAX_ITEM_LIST_LENGTH"]
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"train_window_stride must be a positive integer (items between window ends) or ~ "
                         f"(= MAX_ITEM_LIST_LENGTH), got {stride!r}.")
    return sequences_of_rows(dataset, window_rows(dataset, stride))


def shared_negative_count(config) -> int:
    """K, the negatives a batch shares under ``loss_type: SAMPLED_SOFTMAX``; 0 under any other loss."""
    if str(config["loss_type"]).upper() != SAMPLED_SOFTMAX:
        return 0
    count = config["sampled_softmax_negatives"]
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"sampled_softmax_negatives must be a positive integer (negatives shared by a batch), "
                         f"got {count!r}.")
    return count


def negatives(sampler, shared: int, history: torch.Tensor, num: int, group: int | None = None) -> dict:
    """A batch's negatives: ``shared`` > 0 draws that many shared by the batch (SHARED_NEGATIVES,
    SHARED_NEG_LOG_Q), else ``num`` per row avoiding the row's ``history`` (NEG_LIST [B, num])."""
    if shared:
        items, log_q = sampler.sample_shared(shared, group=group)
        return {SHARED_NEGATIVES: items.unsqueeze(0), SHARED_NEG_LOG_Q: log_q.unsqueeze(0)}
    return {NEG_LIST: sampler.sample(history, num, group=group)}


class UserSequenceDataLoader(AbstractDataLoader):
    """One row per training window (:func:`training_windows`); ``user_data`` holds them all."""

    def __init__(self, config, dataset, sampler, shuffle=True):
        self._setup_windows(config, dataset)
        super().__init__(config, dataset, sampler, shuffle=shuffle)

    def _setup_windows(self, config, dataset) -> None:
        self.user_data = training_windows(config, dataset)
        self.sample_size = len(self.user_data)
        self.seq_field = dataset.item_id_list_field
        self.shared_negatives = shared_negative_count(config)
        self.whole_history = negative_history(config, dataset)  # negative_exclude: history (else None)

    def _init_batch_size_and_step(self):
        batch_size = self.config["train_batch_size"]
        self.step = batch_size
        self.set_batch_size(batch_size)

    def _rows(self, index):
        """The users' rows of ``index`` and their history (input and target items) to exclude."""
        batch = self.user_data[torch.as_tensor(np.asarray(index), dtype=torch.long)]
        history = torch.cat([batch[self.seq_field], batch[TARGET_LIST]], dim=1)
        if self.whole_history is not None:
            history = with_whole_history(self.whole_history, batch[self._dataset.uid_field].numpy(), history)
        return batch, history

    def collate_fn(self, index):
        batch, history = self._rows(index)
        drawn = negatives(self._sampler, self.shared_negatives, history, batch[self.seq_field].shape[1])
        batch.update(Interaction(drawn))
        return batch

    def state_dict(self) -> dict:
        """The random state a resumed run needs to draw the same batches and negatives (see resume.py)."""
        return {"generator": self.generator.get_state(), "sampler": self._sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._sampler.load_state_dict(state["sampler"])


class GroupBatchSampler(torch.utils.data.Sampler):
    """Lists of row indices, each of at most ``batch_size`` rows of one group.

    Per epoch: each group's rows are shuffled and cut into batches, then all groups' batches are
    shuffled together, from a generator seeded with (seed, epoch). The epoch counts the iterations
    started so far, so two samplers with the same seed yield the same sequence of epochs. Without
    shuffling: group 0's batches first (rows in order), then group 1's, etc."""

    def __init__(self, row_group: np.ndarray, batch_size: int, shuffle: bool, seed: int):
        self.row_group = np.asarray(row_group)
        self.groups = np.unique(self.row_group)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        sizes = np.bincount(np.searchsorted(self.groups, self.row_group), minlength=len(self.groups))
        return int(sum(-(-int(size) // self.batch_size) for size in sizes))

    def batches(self, epoch: int) -> list[list[int]]:
        """The batches of ``epoch`` (no side effect)."""
        rng = np.random.default_rng([self.seed, epoch]) if self.shuffle else None
        batches = []
        for group in self.groups:
            rows = np.flatnonzero(self.row_group == group)
            if rng is not None:
                rows = rng.permutation(rows)
            batches += [rows[i : i + self.batch_size].tolist() for i in range(0, len(rows), self.batch_size)]
        if rng is not None:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        return iter(self.batches(epoch))


class GroupBatchesMixin:
    """What the grouped loaders share (put it first among the bases): batches from a
    :class:`GroupBatchSampler` over ``self.row_group`` (the group of each of ``self.sample_size`` rows),
    and its epoch counter in the loader state (resume)."""

    def _init_group_batches(self, config, dataset, sampler, shuffle) -> None:
        # What AbstractDataLoader.__init__ sets; it cannot be called since it passes batch_size/shuffle
        # to torch's DataLoader, which then rejects a batch_sampler.
        self.shuffle = shuffle
        self.config = config
        self._dataset = dataset
        self._sampler = sampler
        self._batch_size = self.step = self.model = None
        self._init_batch_size_and_step()
        self.generator = torch.Generator()
        self.generator.manual_seed(config["seed"])
        self.transform = construct_transform(config)
        self.is_sequential = config["MODEL_TYPE"] == ModelType.SEQUENTIAL
        self.group_batch_sampler = GroupBatchSampler(self.row_group, self.step, shuffle, config["seed"])
        torch.utils.data.DataLoader.__init__(
            self,
            dataset=list(range(self.sample_size)),
            batch_sampler=self.group_batch_sampler,
            collate_fn=self.collate_fn,
            num_workers=config["worker"],
            generator=self.generator,
        )

    def _init_batch_size_and_step(self):
        super()._init_batch_size_and_step()
        if hasattr(self, "group_batch_sampler"):  # update_config after construction
            self.group_batch_sampler.batch_size = self.step

    def state_dict(self) -> dict:
        return {**super().state_dict(), "batch_epoch": self.group_batch_sampler.epoch}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.group_batch_sampler.epoch = int(state["batch_epoch"])


class GroupedUserSequenceDataLoader(GroupBatchesMixin, UserSequenceDataLoader):
    """:class:`UserSequenceDataLoader` whose batches each hold windows of users of one group (PerPEFT §3.3.2).

    ``group_of_user[u]`` is the group of internal user id ``u`` (-1: none); every user of the
    training data needs a group (a window has its user's). Batches carry ``GROUP_ID`` [B] (one value) and
    draw their negatives with ``sampler.sample(history, L, group=g)`` or ``sample_shared(K, group=g)``
    (group pools with a
    :class:`~recbole_perpeft.data.sampler.GroupNegativeSampler`, all items with a
    :class:`~recbole_perpeft.data.sampler.SequenceNegativeSampler`). Batch order: see
    :class:`GroupBatchSampler`; it is seeded from ``config["seed"]`` and the epoch."""

    def __init__(self, config, dataset, sampler, group_of_user: np.ndarray, shuffle=True):
        if not config["single_spec"]:
            raise ValueError("GroupedUserSequenceDataLoader does not support distributed training.")
        self._setup_windows(config, dataset)
        group_of_user = np.asarray(group_of_user)
        users = self.user_data[dataset.uid_field].numpy()
        if len(users) and users.max() >= len(group_of_user):
            raise ValueError(f"group_of_user has {len(group_of_user)} entries; user id {users.max()} has none.")
        self.row_group = group_of_user[users].astype(np.int64)
        ungrouped = int((self.row_group < 0).sum())
        if ungrouped:
            raise ValueError(f"{ungrouped} user(s) of the training data have no group (group_of_user < 0).")

        self._init_group_batches(config, dataset, sampler, shuffle)

    def collate_fn(self, index):
        groups = np.unique(self.row_group[np.asarray(index)])
        if len(groups) != 1:
            raise ValueError(f"A batch holds users of groups {groups.tolist()}; expected one group.")
        group = int(groups[0])
        batch, history = self._rows(index)
        drawn = negatives(self._sampler, self.shared_negatives, history, batch[self.seq_field].shape[1], group)
        batch.update(Interaction({**drawn, GROUP_ID: torch.full((len(index),), group, dtype=torch.long)}))
        return batch
