"""User grouping by interest vectors (PerPEFT §3.2.2).

Users are clustered on their interest vectors; each group later gets its own PEFT adapter and its own
candidate item pool I^(c) (§3.3.2). Only real users with data enter the fit, labels are indexed by
internal RecBole user id (-1 = padding id 0 or a user left out), and a group that ends up empty is
dropped so that no adapter is ever trained on nothing. The fitted model is kept as plain arrays so a
checkpoint can hold it (``torch.load(weights_only=True)``) and new users can be assigned later.

Beyond the paper (its limitation D.3.2: one group per user), :meth:`UserGroups.assign_soft` gives a user
its k most likely groups and mixing weights by the grouping's own rule (K-Means: distance to the
centres; GMM: the posterior). The vectors the grouping was fitted on are kept (``interest_vectors``) so
that training users get their weights from exactly what placed them in their group; groups saved
before they were kept load as before and assign hard only."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.mixture import GaussianMixture
from sklearn.mixture._gaussian_mixture import _compute_precision_cholesky

from recbole_perpeft.config_values import choice

METHODS = ("kmeans", "gmm", "random")
# Soft assignment: the rule each grouping method assigns by (random groups have no geometry to weigh by).
SOFT_WEIGHTINGS = {"kmeans": "distance", "gmm": "posterior"}
_ARRAY_FIELDS = ("centers", "gmm_weights", "gmm_means", "gmm_covariances", "interest_vectors")


@dataclass
class UserGroups:
    labels: np.ndarray  # [n_users] int64: group of each internal user id; -1 = not grouped
    n_groups: int
    method: str  # "kmeans" | "gmm" | "random"
    seed: int
    centers: np.ndarray | None = None  # kmeans: [C, D] float32 centroids
    gmm_weights: np.ndarray | None = None  # gmm ('full' covariances): [C]
    gmm_means: np.ndarray | None = None  # [C, D]
    gmm_covariances: np.ndarray | None = None  # [C, D, D]
    # [n_users, D] float32: the vectors the fit saw (rows of ungrouped ids are zeros); None in groups
    # saved before soft assignment existed.
    interest_vectors: np.ndarray | None = None

    def sizes(self) -> list[int]:
        """Users per group (length ``n_groups``); ungrouped ids are not counted."""
        return np.bincount(self.labels[self.labels >= 0], minlength=self.n_groups).tolist()

    def assign(self, vectors: np.ndarray) -> np.ndarray:
        """Groups [M] int64 of new users' interest vectors [M, D], by the rule the fit used."""
        vectors = np.asarray(vectors)
        if self.method == "random":
            return np.random.default_rng(self.seed).integers(self.n_groups, size=len(vectors)).astype(np.int64)
        if vectors.ndim != 2:
            raise ValueError(f"assign expects interest vectors of shape [M, D], got {vectors.shape}.")
        if self.method == "kmeans":
            # Same rule as KMeans.predict: nearest centroid in Euclidean distance (||x||^2 is constant per row).
            x, c = vectors.astype(np.float64), self.centers.astype(np.float64)
            return np.argmin((c * c).sum(axis=1)[None, :] - 2.0 * x @ c.T, axis=1).astype(np.int64)
        if self.method == "gmm":
            return self._gaussian_mixture().predict(vectors.astype(np.float64)).astype(np.int64)
        raise ValueError(f"Unknown grouping method {self.method!r}; expected one of {METHODS}.")

    def assign_soft(self, vectors: np.ndarray, k: int, weighting: str | None = None,
                    temperature: float | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """The ``k`` groups [M, k] int64 of new users' interest vectors [M, D] with the most weight, most
        first, and their weights [M, k] float32 (summing to 1 per row): a softmax over all groups,
        restricted to the top ``k`` and renormalised. ``k=1`` is :meth:`assign` with weight 1.

        ``weighting`` (None: the grouping's own rule) is ``distance`` (K-Means) or ``posterior`` (GMM);
        ``temperature`` (None: 1) sharpens (< 1) or flattens (> 1) the weights, see :func:`soft_logits`."""
        weighting = check_soft_groups(k, weighting, temperature, self.method, self.n_groups)
        if k == 1:
            return self.assign(vectors)[:, None], np.ones((len(vectors), 1), dtype=np.float32)
        temperature = 1.0 if temperature is None else float(temperature)
        vectors = np.asarray(vectors, dtype=np.float64)
        if vectors.ndim != 2:
            raise ValueError(f"assign_soft expects interest vectors of shape [M, D], got {vectors.shape}.")
        if weighting == "distance":
            # Exact differences, not |x|^2 + |c|^2 - 2x.c: the logits divide by the nearest squared distance,
            # which the expansion's cancellation would make noisy. In chunks, to bound the [m, C, D] temporary.
            c = self.centers.astype(np.float64)
            sq_dist = np.concatenate([((chunk[:, None, :] - c[None]) ** 2).sum(-1)
                                      for chunk in np.array_split(vectors, max(1, len(vectors) // 4096))])  # fmt: skip
            logits = soft_logits(sq_dist, temperature)
        else:
            with np.errstate(divide="ignore"):  # a posterior that underflows to 0 is weight 0
                logits = np.log(self._gaussian_mixture().predict_proba(vectors)) / temperature
        logits = logits - logits.max(axis=1, keepdims=True)
        weights = np.exp(logits)
        weights /= weights.sum(axis=1, keepdims=True)
        # Most weight first; equal weights in group order (a stable sort), so the order is deterministic.
        top = np.argsort(-weights, axis=1, kind="stable")[:, :k]
        kept = np.take_along_axis(weights, top, axis=1)
        return top.astype(np.int64), (kept / kept.sum(axis=1, keepdims=True)).astype(np.float32)

    def user_soft_groups(self, k: int, weighting: str | None = None,
                         temperature: float | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """:meth:`assign_soft` of every fitted user from the vectors it was fitted on: groups [n_users, k]
        (-1 for ungrouped ids) and weights [n_users, k] (0 there)."""
        check_soft_groups(k, weighting, temperature, self.method, self.n_groups)
        groups = np.full((len(self.labels), k), -1, dtype=np.int64)
        weights = np.zeros((len(self.labels), k), dtype=np.float32)
        if k == 1:  # the hard assignment, which needs no stored vectors (groups saved before they were kept)
            groups[:, 0], weights[:, 0] = self.labels, (self.labels >= 0).astype(np.float32)
            return groups, weights
        if self.interest_vectors is None:
            raise ValueError(
                "These user groups were saved without the interest vectors they were fitted on (a groups file "
                "from before soft assignment): soft_groups > 1 needs them. Use soft_groups: 1, or regroup "
                "(rerun stage 2 from the stage-1 checkpoint with --global_checkpoint)."
            )
        users = np.flatnonzero(self.labels >= 0)
        groups[users], weights[users] = self.assign_soft(self.interest_vectors[users], k, weighting, temperature)
        return groups, weights

    def _gaussian_mixture(self) -> GaussianMixture:
        """A fitted-equivalent sklearn model rebuilt from the stored parameters."""
        gm = GaussianMixture(n_components=self.n_groups, covariance_type="full", random_state=self.seed)
        gm.weights_ = self.gmm_weights
        gm.means_ = self.gmm_means
        gm.covariances_ = self.gmm_covariances
        gm.precisions_cholesky_ = _compute_precision_cholesky(self.gmm_covariances, "full")
        gm.precisions_ = gm.precisions_cholesky_ @ gm.precisions_cholesky_.transpose(0, 2, 1)
        gm.n_features_in_ = self.gmm_means.shape[1]
        gm.converged_, gm.n_iter_, gm.lower_bound_ = True, 0, 0.0
        return gm

    def to_state(self) -> dict:
        """Tensors and plain str/int only, so ``torch.load(weights_only=True)`` can read it back."""
        state = {
            "labels": torch.from_numpy(np.ascontiguousarray(self.labels, dtype=np.int64)),
            "n_groups": int(self.n_groups),
            "method": str(self.method),
            "seed": int(self.seed),
        }
        for name in _ARRAY_FIELDS:
            value = getattr(self, name)
            if value is not None:
                state[name] = torch.from_numpy(np.ascontiguousarray(value))
        return state

    @classmethod
    def from_state(cls, state: dict) -> UserGroups:
        arrays = {name: state[name].numpy() for name in _ARRAY_FIELDS if state.get(name) is not None}
        return cls(
            labels=state["labels"].numpy().astype(np.int64),
            n_groups=int(state["n_groups"]),
            method=str(state["method"]),
            seed=int(state["seed"]),
            **arrays,
        )


GROUPING_SEQUENCES = ("train", "train_valid")  # what the interest vector reads: train items, or + validation
GROUPING_CHECKPOINTS = ("best", "last")  # which stage-1 epoch groups users and starts stage 2


def grouping_source(config) -> tuple[str, str]:
    """(``grouping_sequence``, ``grouping_checkpoint``), checked (properties/model/TwoStageGrouped.yaml):
    ours is (train, best), the official code's (train_valid, last)."""
    hint = "(properties/model/TwoStageGrouped.yaml)"
    sequence = config["grouping_sequence"] if "grouping_sequence" in config else None
    checkpoint = config["grouping_checkpoint"] if "grouping_checkpoint" in config else None
    return (choice(str(sequence or "train").lower(), GROUPING_SEQUENCES, "grouping_sequence", hint, given=sequence),
            choice(str(checkpoint or "best").lower(), GROUPING_CHECKPOINTS, "grouping_checkpoint", hint,
                   given=checkpoint))  # fmt: skip


def check_grouping(n_groups, method: str, n_users: int) -> None:
    """The grouping settings against the users to group: checked before stage 1 trains, and again at
    the grouping itself."""
    choice(method, METHODS, "grouping_method")
    if isinstance(n_groups, bool) or not isinstance(n_groups, int) or not 1 <= n_groups <= n_users:
        raise ValueError(
            f"n_groups={n_groups} is invalid for {n_users} users with interest vectors: "
            f"it must be an integer between 1 and {n_users}; lower --n_groups (or raise it to at least 1)."
        )


def soft_logits(sq_dist: np.ndarray, temperature: float) -> np.ndarray:
    """Distance weighting's logits [M, C] from squared distances [M, C] to the centres:
    -d_c^2 / (temperature * d_min^2), d_min the user's distance to its nearest centre.

    Why relative to d_min: the interest space has no natural unit (its scale follows the backbone's
    training), so an absolute temperature would mean something else for every run. Divided by the
    nearest squared distance, the weights depend only on ratios of distances: the same under any
    rescaling of the vectors, and per user, so that a user far out between two centres gets a mix
    while one close to its centre stays nearly hard. With temperature 1 a centre twice as far (in
    squared distance) as the nearest weighs e^-1 of it. A user exactly on a centre keeps that group alone."""
    nearest = sq_dist.min(axis=1, keepdims=True)
    scale = temperature * np.maximum(nearest, np.finfo(np.float64).tiny)
    with np.errstate(over="ignore"):  # on a centre: the other groups' logits overflow to -inf, weight 0
        return -(sq_dist - nearest) / scale


def check_soft_groups(k, weighting: str | None, temperature, method: str, n_groups: int) -> str:
    """Soft-assignment settings against the grouping; returns the weighting (None: the method's own)."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_groups:
        raise ValueError(f"soft_groups={k!r} is invalid: it must be an integer between 1 (each user in its own "
                         f"group, the paper's) and n_groups={n_groups} (every group's model mixed).")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, int | float)
                                    or not temperature > 0):  # fmt: skip
        raise ValueError(f"soft_group_temperature must be a positive number (or ~ for 1), got {temperature!r}.")
    if weighting is not None and str(weighting).lower() not in SOFT_WEIGHTINGS.values():
        raise ValueError(f"Unknown soft_group_weighting {weighting!r}; expected distance (kmeans), posterior "
                         "(gmm) or ~ (the grouping's own rule).")
    own = SOFT_WEIGHTINGS.get(method)
    weighting = own if weighting is None else str(weighting).lower()
    if k == 1:
        return weighting  # the hard assignment: every method has one, whatever the weighting
    if own is None:
        raise ValueError(f"soft_groups={k} needs a grouping with a geometry to weigh groups by; grouping_method "
                         f"{method!r} has none. Use grouping_method kmeans or gmm, or soft_groups: 1.")
    if weighting != own:
        raise ValueError(f"soft_group_weighting {weighting} does not fit grouping_method {method}, which groups by "
                         f"{own}: set soft_group_weighting: {own} (or ~ for the grouping's own rule).")
    return weighting


def fit_user_groups(
    vectors: np.ndarray,
    user_ids: np.ndarray,
    n_users: int,
    n_groups: int = 8,
    method: str = "kmeans",
    seed: int = 2024,
) -> UserGroups:
    """Cluster the interest vectors [U, D] of real users ``user_ids`` [U] (internal ids 1..n_users-1).

    Deterministic for a given seed. Empty groups are dropped and the rest relabelled 0..C'-1 in order."""
    vectors, user_ids = np.asarray(vectors), np.asarray(user_ids, dtype=np.int64)
    if vectors.ndim != 2 or user_ids.ndim != 1 or len(vectors) != len(user_ids):
        raise ValueError(
            f"Expected vectors [U, D] and user_ids [U] of the same length, got {vectors.shape} and {user_ids.shape}."
        )
    if (user_ids == 0).any():
        raise ValueError("user_ids contains 0, the padding id: only real users may enter the grouping.")
    if ((user_ids < 0) | (user_ids >= n_users)).any():
        raise ValueError(f"user_ids must be internal ids in 1..{n_users - 1} (n_users={n_users}).")
    if len(np.unique(user_ids)) != len(user_ids):
        raise ValueError("user_ids contains duplicates: each user needs exactly one interest vector.")
    if not np.isfinite(vectors).all():
        raise ValueError("Interest vectors contain NaN or inf.")
    n_fit = len(user_ids)
    check_grouping(n_groups, method, n_fit)

    params: dict[str, np.ndarray] = {}
    if method == "kmeans":
        km = KMeans(n_clusters=n_groups, init="k-means++", n_init=10, random_state=seed)
        km.fit(vectors.astype(np.float32))
        fit_labels = km.labels_
        params["centers"] = km.cluster_centers_.astype(np.float32)
    elif method == "gmm":
        x = vectors.astype(np.float64)
        gm = GaussianMixture(n_components=n_groups, covariance_type="full", random_state=seed, reg_covar=1e-4)
        fit_labels = gm.fit(x).predict(x)  # = posterior argmax, so assign() reproduces the fit's labels
        params.update(gmm_weights=gm.weights_, gmm_means=gm.means_, gmm_covariances=gm.covariances_)
    else:
        fit_labels = np.random.default_rng(seed).integers(n_groups, size=n_fit)

    fit_labels = np.asarray(fit_labels, dtype=np.int64)
    counts = np.bincount(fit_labels, minlength=n_groups)
    kept = np.flatnonzero(counts > 0)
    if len(kept) < n_groups:
        empty = np.flatnonzero(counts == 0).tolist()
        logging.getLogger().warning(
            f"User grouping ({method}, seed {seed}): group(s) {empty} of {n_groups} got no users; "
            f"dropped, {len(kept)} groups remain."
        )
        remap = np.full(n_groups, -1, dtype=np.int64)
        remap[kept] = np.arange(len(kept))
        fit_labels = remap[fit_labels]
        params = {name: value[kept] for name, value in params.items()}
        if "gmm_weights" in params:
            params["gmm_weights"] = params["gmm_weights"] / params["gmm_weights"].sum()

    labels = np.full(n_users, -1, dtype=np.int64)
    labels[user_ids] = fit_labels
    fitted = np.zeros((n_users, vectors.shape[1]), dtype=np.float32)
    fitted[user_ids] = vectors
    groups = UserGroups(labels=labels, n_groups=len(kept), method=method, seed=seed, interest_vectors=fitted, **params)
    logging.getLogger().info(f"User grouping ({method}, seed {seed}): {groups.n_groups} groups, sizes {groups.sizes()}")
    return groups


def group_item_pools(groups: UserGroups, user_ids: np.ndarray, histories: np.ndarray, n_items: int) -> list[np.ndarray]:
    """I^(c) for each group c: sorted unique item ids (> 0) in the training histories of its users.

    ``histories`` [U, T] holds item ids (0 = padding); row i belongs to user ``user_ids[i]``. Users that
    are not grouped (label -1) contribute nothing."""
    user_ids, histories = np.asarray(user_ids, dtype=np.int64), np.asarray(histories, dtype=np.int64)
    if histories.ndim != 2 or len(histories) != len(user_ids):
        raise ValueError(f"Expected histories [U, T] for {len(user_ids)} users, got {histories.shape}.")
    if ((histories < 0) | (histories >= n_items)).any():
        raise ValueError(f"histories must hold item ids in 0..{n_items - 1} (n_items={n_items}).")
    row_groups = groups.labels[user_ids]
    rows = np.flatnonzero(row_groups >= 0)
    present = np.zeros((groups.n_groups, n_items), dtype=bool)
    present[np.repeat(row_groups[rows], histories.shape[1]), histories[rows].reshape(-1)] = True
    present[:, 0] = False
    return [np.flatnonzero(present[c]).astype(np.int64) for c in range(groups.n_groups)]


def training_item_pools(train_dataset, groups: UserGroups) -> list[np.ndarray]:
    """I^(c) from RecBole's augmented training split: every training item is some row's target or
    in its item list, so the rows' items cover each user's whole training sequence."""
    feat = train_dataset.inter_feat
    rows = np.concatenate(
        [feat[train_dataset.item_id_list_field].numpy(), feat[train_dataset.iid_field].numpy()[:, None]], axis=1
    )
    return group_item_pools(groups, feat[train_dataset.uid_field].numpy(), rows, train_dataset.item_num)
