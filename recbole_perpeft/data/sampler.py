"""Negative sampling over all items or a group's pool (§3.3.4): one negative per (user, position) for
Eq. 1, or one set of negatives shared by a whole batch for the sampled softmax (``sample_shared``)."""

from __future__ import annotations

import math
from logging import getLogger

import numpy as np
import torch


class SequenceNegativeSampler:
    """One negative per (user, position), uniform over ``candidates`` (default: every real item),
    never an item of that user's own sequence. Seeded: the same seed draws the same negatives.

    RecBole's samplers exclude a user's interactions per row; here a whole [B, L] block is drawn
    at once with rejection, which is what a loss at every position needs."""

    def __init__(self, n_items: int, seed: int, candidates: np.ndarray | None = None):
        self.n_items = n_items
        self.candidates = np.arange(1, n_items) if candidates is None else np.asarray(candidates)
        self.rng = np.random.default_rng(seed)

    def sample(self, history: torch.Tensor, num: int, group: int | None = None) -> torch.Tensor:
        """``history`` [B, T] item ids (0 = padding) to exclude per user; returns [B, num] negatives.

        ``group`` is accepted and ignored, so a loader can call every sampler the same way."""
        return torch.from_numpy(self._draw(self._excluded(history), self.candidates, num)).long()

    def sample_shared(self, num: int, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``num`` distinct negatives shared by a whole batch, uniform over ``candidates`` (``group`` is
        ignored, as in :meth:`sample`): ([K] item ids, [K] log-probabilities that each is in the draw)."""
        return self._draw_shared(self.candidates, num)

    def _draw_shared(self, pool: np.ndarray, num: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K = min(num, |pool|) distinct items of ``pool``, drawn uniformly without replacement from the
        seeded generator, and log Q for each: every item of the pool is in the draw with probability
        Q = K / |pool| (1 when the whole pool is taken, which then needs no draw). No user's history is
        excluded: the draw serves every position of the batch; the loss masks a position's own positive."""
        if num < 1:
            raise ValueError(f"sampled_softmax_negatives must be a positive integer, got {num!r}.")
        if len(pool) == 0:
            raise ValueError("No candidate item to draw shared negatives from (an empty pool).")
        if num >= len(pool):
            items = np.asarray(pool, dtype=np.int64)
        else:
            items = self.rng.choice(pool, size=num, replace=False).astype(np.int64)
        log_q = math.log(len(items) / len(pool))
        return torch.from_numpy(items), torch.full((len(items),), log_q)

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]

    def _excluded(self, history: torch.Tensor) -> np.ndarray:
        """[B, n_items] bool: True where the item is padding (0) or in that row's history."""
        hist = history.numpy()
        batch = hist.shape[0]
        excluded = np.zeros((batch, self.n_items), dtype=bool)
        excluded[np.repeat(np.arange(batch), hist.shape[1]), hist.reshape(-1)] = True
        excluded[:, 0] = True
        return excluded

    def _draw(self, excluded: np.ndarray, candidates: np.ndarray, num: int) -> np.ndarray:
        """[len(excluded), num] items drawn uniformly from ``candidates`` with rejection of each row's excluded ones."""
        batch = excluded.shape[0]
        if excluded[:, candidates].all(axis=1).any():
            raise ValueError("A user's sequence covers every candidate item: no negative can be drawn.")
        negatives = candidates[self.rng.integers(len(candidates), size=(batch, num))]
        rows = np.arange(batch)[:, None].repeat(num, axis=1)
        bad = excluded[rows, negatives]
        while bad.any():
            negatives[bad] = candidates[self.rng.integers(len(candidates), size=int(bad.sum()))]
            bad = excluded[rows, negatives]
        return negatives


class GroupNegativeSampler(SequenceNegativeSampler):
    """Negatives of a group-``c`` batch drawn uniformly from ``pools[c]`` = I^(c), the items group-``c``
    users bought in training (PerPEFT §3.3.4), never an item of the user's own sequence.

    A user whose pool is entirely inside their own sequence draws from every item instead (minus
    their sequence); the first time this happens for a group a WARNING names it. ``group=None``
    samples over every item, as :class:`SequenceNegativeSampler` does."""

    def __init__(self, n_items: int, seed: int, pools: list[np.ndarray]):
        super().__init__(n_items, seed)
        self.pools = []
        for group, pool in enumerate(pools):
            pool = np.unique(np.asarray(pool, dtype=np.int64))
            if len(pool) and (pool[0] < 1 or pool[-1] >= n_items):
                raise ValueError(f"The item pool of group {group} holds ids outside 1..{n_items - 1}.")
            self.pools.append(pool)
        self._warned: set[int] = set()

    def sample(self, history: torch.Tensor, num: int, group: int | None = None) -> torch.Tensor:
        if group is None:
            return super().sample(history, num)
        group = int(group)
        if not 0 <= group < len(self.pools):
            raise ValueError(f"Group {group} has no item pool (there are {len(self.pools)} groups).")
        pool = self.pools[group]
        excluded = self._excluded(history)
        fallback = excluded[:, pool].all(axis=1)  # also True for an empty pool
        if not fallback.any():
            return torch.from_numpy(self._draw(excluded, pool, num)).long()
        if group not in self._warned:
            self._warned.add(group)
            getLogger().warning(
                f"Group {group}: {int(fallback.sum())} user(s) have every item of the group's pool "
                f"({len(pool)} items) in their own sequence; their negatives are drawn from all items "
                "(further occurrences for this group are not reported)."
            )
        negatives = np.empty((excluded.shape[0], num), dtype=np.int64)
        if (~fallback).any():
            negatives[~fallback] = self._draw(excluded[~fallback], pool, num)
        negatives[fallback] = self._draw(excluded[fallback], self.candidates, num)
        return torch.from_numpy(negatives).long()

    def sample_shared(self, num: int, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Shared negatives of a group-``c`` batch: uniform over ``pools[c]`` = I^(c) (log Q from that
        pool's size); an empty pool draws from every item, with the same one-time WARNING as :meth:`sample`.
        ``group=None``: every item."""
        if group is None:
            return super().sample_shared(num)
        group = int(group)
        if not 0 <= group < len(self.pools):
            raise ValueError(f"Group {group} has no item pool (there are {len(self.pools)} groups).")
        pool = self.pools[group]
        if len(pool):
            return self._draw_shared(pool, num)
        if group not in self._warned:
            self._warned.add(group)
            getLogger().warning(f"Group {group} has an empty item pool; its shared negatives are drawn from all items.")
        return self._draw_shared(self.candidates, num)
