"""A user's own past items: removed from the full ranking (``eval_exclude_history``) and, under
``negative_exclude: history``, from the pool its Eq. 1 negatives are drawn from.

RecBole's ``FullSortEvalDataLoader`` gives the trainer a ``history_index`` (user rows, item columns) for
general models, and ``Trainer._full_sort_batch_eval`` sets those scores to -inf; for sequential models it
gives none, so a user's own past items are ranked with the rest. The official PerPEFT code removes them:
the training items at validation, the training and validation items at test, the target always kept
(even when the user had it before). :class:`HistoryMaskedFullSortEvalDataLoader` is RecBole's loader with
that ``history_index`` for sequential data: masking happens in RecBole's own full-sort step, so every model
evaluated through our entry point (ours, and RecBole's SASRec) is ranked alike, with no change to any model.

No library keeps per-user item sets of RecBole's augmented sequential splits; they are read here from each
row's input items and target (a scipy CSR matrix, one row per user)."""

from __future__ import annotations

from logging import getLogger

import numpy as np
import scipy.sparse as sp
import torch
from recbole.data.dataloader import FullSortEvalDataLoader
from recbole.utils import ModelType

from recbole_perpeft.config_values import choice, option


def user_items(*datasets) -> sp.csr_matrix:
    """[users, items] CSR (data 1, sorted unique columns per row): every item some row of ``datasets``
    (RecBole sequential splits of one dataset) holds for its user, in its input sequence or as its target."""
    first = datasets[0]
    users, items = [], []
    for dataset in datasets:
        feat = dataset.inter_feat
        uid = feat[dataset.uid_field].numpy()
        users.append(uid)
        items.append(feat[dataset.iid_field].numpy())
        seq = feat[dataset.item_id_list_field].numpy()
        lengths = feat[dataset.item_list_length_field].numpy()
        filled = np.arange(seq.shape[1])[None, :] < lengths[:, None]
        users.append(np.broadcast_to(uid[:, None], seq.shape)[filled])
        items.append(seq[filled])
    users, items = np.concatenate(users), np.concatenate(items)
    matrix = sp.csr_matrix((np.ones(len(users), dtype=np.int8), (users, items)),
                           shape=(first.user_num, first.item_num))  # fmt: skip
    matrix.sum_duplicates()
    matrix.data[:] = 1
    return matrix


def history_rows(matrix: sp.csr_matrix, users) -> tuple[np.ndarray, np.ndarray]:
    """(row in the batch, item) of every history item of ``users`` (a batch's user ids)."""
    part = matrix[np.asarray(users, dtype=np.int64)]
    return np.repeat(np.arange(part.shape[0]), np.diff(part.indptr)), part.indices.astype(np.int64)


class HistoryMaskedFullSortEvalDataLoader(FullSortEvalDataLoader):
    """RecBole's full-sort loader over a sequential split, whose batches carry the users' ``history``
    items (a :func:`user_items` matrix) as RecBole's ``history_index``, less each row's own target."""

    def __init__(self, config, dataset, sampler, history: sp.csr_matrix, shuffle=False):
        self.history = history
        super().__init__(config, dataset, sampler, shuffle=shuffle)

    def collate_fn(self, index):
        interaction, _, positive_u, positive_i = super().collate_fn(index)
        rows, items = history_rows(self.history, interaction[self.uid_field].numpy())
        keep = items != positive_i.numpy()[rows]  # the target stays rankable even if the user had it before
        history_index = (torch.from_numpy(rows[keep]), torch.from_numpy(items[keep]))
        return interaction, history_index, positive_u, positive_i


def exclude_history(config) -> bool:
    value = option(config, "eval_exclude_history", False)
    if not isinstance(value, bool):
        raise ValueError(f"eval_exclude_history must be True (remove each user's past items from its ranking: "
                         f"training items at validation, training + validation items at test) or False, "
                         f"got {value!r}.")  # fmt: skip
    return value


def history_masked_loaders(config, train_data, valid_data, test_data):
    """(valid, test) loaders ranking without each user's past items when ``eval_exclude_history`` is on and
    the evaluation is a sequential full sort (a general model's RecBole loader already masks its history)."""
    if not exclude_history(config) or config["MODEL_TYPE"] != ModelType.SEQUENTIAL:
        return valid_data, test_data
    loaders = [loader for loader in (valid_data, test_data) if loader is not None]
    if not all(type(loader) is FullSortEvalDataLoader for loader in loaders):
        getLogger().warning("eval_exclude_history applies to full ranking (eval_args mode: full) only; this "
                            "evaluation samples its candidates, and ranks them unmasked.")  # fmt: skip
        return valid_data, test_data
    train = train_data._dataset
    seen = user_items(train)
    masked = []
    for loader in (valid_data, test_data):
        if loader is None:
            masked.append(None)
            continue
        masked.append(HistoryMaskedFullSortEvalDataLoader(config, loader._dataset, loader._sampler, seen))
        seen = seen + user_items(loader._dataset)  # test also masks the validation items
        seen.data[:] = 1
    return masked[0], masked[1]


NEGATIVE_EXCLUDE = ("window", "history")


def negative_history(config, dataset) -> sp.csr_matrix | None:
    """``negative_exclude``: history gives the users' whole training histories (:func:`user_items` of the
    train split ``dataset``) for the negatives to avoid; window gives None (the window's own items only)."""
    value = option(config, "negative_exclude", "window")
    mode = choice(str(value).lower(), NEGATIVE_EXCLUDE, "negative_exclude",
                  "(window: a negative avoids the window's items; history: the user's whole training history)",
                  given=value)  # fmt: skip
    return user_items(dataset) if mode == "history" else None


def with_whole_history(matrix: sp.csr_matrix, users, window_items: torch.Tensor) -> torch.Tensor:
    """[B, T + H] a batch's window items (``window_items`` [B, T]) and each row's user's whole training
    history from ``matrix``, 0-padded to the longest (H): what a negative sampler excludes per row."""
    rows, items = history_rows(matrix, users)
    counts = np.bincount(rows, minlength=len(window_items))
    padded = np.zeros((len(window_items), max(int(counts.max(initial=0)), 1)), dtype=np.int64)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    padded[rows, np.arange(len(rows)) - starts[rows]] = items
    return torch.cat([window_items, torch.from_numpy(padded).to(window_items.dtype)], dim=1)
