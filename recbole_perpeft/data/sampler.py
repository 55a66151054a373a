"""Negative sampling for the one-sequence-per-user loss (Eq. 1)."""

from __future__ import annotations

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

    def sample(self, history: torch.Tensor, num: int) -> torch.Tensor:
        """``history`` [B, T] item ids (0 = padding) to exclude per user; returns [B, num] negatives."""
        hist = history.numpy()
        batch = hist.shape[0]
        excluded = np.zeros((batch, self.n_items), dtype=bool)
        excluded[np.repeat(np.arange(batch), hist.shape[1]), hist.reshape(-1)] = True
        excluded[:, 0] = True
        if excluded[:, self.candidates].all(axis=1).any():
            raise ValueError("A user's sequence covers every candidate item: no negative can be drawn.")
        negatives = self.candidates[self.rng.integers(len(self.candidates), size=(batch, num))]
        rows = np.arange(batch)[:, None].repeat(num, axis=1)
        bad = excluded[rows, negatives]
        while bad.any():
            negatives[bad] = self.candidates[self.rng.integers(len(self.candidates), size=int(bad.sum()))]
            bad = excluded[rows, negatives]
        return torch.from_numpy(negatives).long()
