"""User grouping (§3.2.2): determinism, recovery of clear clusters, empty groups, assignment, state, item pools."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.mixture import GaussianMixture

from recbole_perpeft import grouping
from recbole_perpeft.grouping import UserGroups, fit_user_groups, group_item_pools

BLOB_CENTRES = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 5.0]], dtype=np.float32)


def blobs(per_blob: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three well-separated gaussian blobs for users 1..3*per_blob: (vectors, user_ids, true blob)."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(3), per_blob)
    vectors = (BLOB_CENTRES[truth] + rng.normal(scale=0.5, size=(len(truth), 3))).astype(np.float32)
    user_ids = rng.permutation(len(truth)) + 1
    return vectors, user_ids, truth


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Labels agree up to a permutation of group ids."""
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize("method", ["kmeans", "gmm", "random"])
def test_same_seed_same_labels(method):
    vectors, user_ids, _ = blobs()
    first = fit_user_groups(vectors, user_ids, n_users=61, n_groups=3, method=method, seed=7)
    second = fit_user_groups(vectors, user_ids, n_users=61, n_groups=3, method=method, seed=7)
    np.testing.assert_array_equal(first.labels, second.labels)
    assert first.labels.dtype == np.int64 and first.labels.shape == (61,)


def test_random_groups_follow_the_seed():
    vectors, user_ids, _ = blobs()
    a = fit_user_groups(vectors, user_ids, n_users=61, n_groups=3, method="random", seed=1)
    b = fit_user_groups(vectors, user_ids, n_users=61, n_groups=3, method="random", seed=2)
    assert not np.array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.labels[user_ids], np.random.default_rng(1).integers(3, size=len(user_ids)))


@pytest.mark.parametrize("method", ["kmeans", "gmm"])
def test_separated_blobs_are_recovered(method):
    vectors, user_ids, truth = blobs()
    groups = fit_user_groups(vectors, user_ids, n_users=61, n_groups=3, method=method, seed=0)
    assert groups.n_groups == 3 and groups.method == method
    assert same_partition(groups.labels[user_ids], truth)
    assert sorted(groups.sizes()) == [20, 20, 20]
    # Each blob's centre lands in the group of that blob's users.
    centre_groups = groups.assign(BLOB_CENTRES)
    for blob in range(3):
        assert (groups.labels[user_ids[truth == blob]] == centre_groups[blob]).all()


@pytest.mark.parametrize("method", ["kmeans", "gmm", "random"])
def test_padding_and_absent_users_are_not_grouped(method):
    vectors, user_ids, _ = blobs(per_blob=5)
    n_users = 40  # ids 16..39 have no interest vector
    groups = fit_user_groups(vectors, user_ids, n_users=n_users, n_groups=3, method=method, seed=0)
    assert groups.labels[0] == -1
    absent = np.setdiff1d(np.arange(1, n_users), user_ids)
    assert (groups.labels[absent] == -1).all()
    assert (groups.labels[user_ids] >= 0).all() and (groups.labels[user_ids] < groups.n_groups).all()
    assert sum(groups.sizes()) == len(user_ids)


def test_kmeans_and_gmm_parameters_have_documented_shapes():
    vectors, user_ids, _ = blobs()
    km = fit_user_groups(vectors, user_ids, n_users=61, n_groups=3, method="kmeans")
    assert km.centers.shape == (3, 3) and km.centers.dtype == np.float32 and km.gmm_means is None
    gm = fit_user_groups(vectors, user_ids, n_users=61, n_groups=3, method="gmm")
    assert gm.gmm_weights.shape == (3,) and gm.gmm_means.shape == (3, 3) and gm.gmm_covariances.shape == (3, 3, 3)
    assert gm.centers is None
    assert gm.gmm_weights.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("n_groups", [0, -1, 61])
def test_invalid_group_count(n_groups):
    vectors, user_ids, _ = blobs()
    with pytest.raises(ValueError, match=r"n_groups=.*60 users.*lower --n_groups"):
        fit_user_groups(vectors, user_ids, n_users=61, n_groups=n_groups)


def test_unknown_method_lists_the_known_ones():
    vectors, user_ids, _ = blobs()
    with pytest.raises(ValueError, match="kmeans.*gmm.*random"):
        fit_user_groups(vectors, user_ids, n_users=61, n_groups=3, method="spectral")


def test_bad_user_ids():
    vectors, user_ids, _ = blobs(per_blob=3)
    with pytest.raises(ValueError, match="padding"):
        fit_user_groups(vectors, np.r_[0, user_ids[1:]], n_users=10, n_groups=2)
    with pytest.raises(ValueError, match="duplicates"):
        fit_user_groups(vectors, np.r_[user_ids[1], user_ids[1:]], n_users=10, n_groups=2)
    with pytest.raises(ValueError, match="same length"):
        fit_user_groups(vectors[:-1], user_ids, n_users=10, n_groups=2)
    with pytest.raises(ValueError, match="internal ids"):
        fit_user_groups(vectors, user_ids, n_users=5, n_groups=2)


def test_empty_random_group_is_dropped_and_relabelled(caplog):
    vectors, user_ids = np.eye(5, dtype=np.float32), np.arange(1, 6)
    raw = np.random.default_rng(0).integers(5, size=5)  # seed 0 leaves group 0 empty: [4 3 2 1 1]
    assert 0 not in raw
    with caplog.at_level(logging.INFO):
        groups = fit_user_groups(vectors, user_ids, n_users=6, n_groups=5, method="random", seed=0)
    assert groups.n_groups == 4
    assert all(size > 0 for size in groups.sizes()) and len(groups.sizes()) == 4
    np.testing.assert_array_equal(groups.labels, [-1, 3, 2, 1, 0, 0])  # raw 1..4 -> 0..3, order kept
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "[0]" in warnings[0].getMessage()
    assert any(r.levelno == logging.INFO and "sizes [2, 1, 1, 1]" in r.getMessage() for r in caplog.records)
    assert (groups.assign(np.zeros((50, 5))) < 4).all()


@pytest.mark.filterwarnings("ignore:Number of distinct clusters")
def test_empty_kmeans_group_from_duplicates_keeps_remaining_centres(caplog):
    vectors = np.array([[0, 0], [0, 0], [1, 1], [1, 1]], dtype=np.float32)
    with caplog.at_level(logging.WARNING):
        groups = fit_user_groups(vectors, np.arange(1, 5), n_users=5, n_groups=3, method="kmeans", seed=0)
    assert groups.n_groups == 2 and groups.sizes() == [2, 2]
    assert any(r.levelno == logging.WARNING for r in caplog.records)
    assert groups.centers.shape == (2, 2)
    # Each kept centre is the centroid of its own users.
    for c in range(2):
        np.testing.assert_allclose(groups.centers[c], vectors[groups.labels[1:] == c].mean(axis=0))
    np.testing.assert_array_equal(groups.assign(vectors), groups.labels[1:])


def test_empty_gmm_group_keeps_parameters_of_the_others_in_order(monkeypatch, caplog):
    class NeverOne(GaussianMixture):
        """Component 1 never wins: its users go to component 0."""

        def predict(self, X):
            labels = super().predict(X)
            return np.where(labels == 1, 0, labels)

    vectors, user_ids, _ = blobs()
    reference = GaussianMixture(3, covariance_type="full", random_state=0, reg_covar=1e-4).fit(vectors.astype(float))
    monkeypatch.setattr(grouping, "GaussianMixture", NeverOne)
    with caplog.at_level(logging.WARNING):
        groups = fit_user_groups(vectors, user_ids, n_users=61, n_groups=3, method="gmm", seed=0)
    assert groups.n_groups == 2 and sorted(groups.sizes()) == [20, 40]
    assert any("[1]" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    np.testing.assert_allclose(groups.gmm_means, reference.means_[[0, 2]])
    np.testing.assert_allclose(groups.gmm_covariances, reference.covariances_[[0, 2]])
    np.testing.assert_allclose(groups.gmm_weights, reference.weights_[[0, 2]] / reference.weights_[[0, 2]].sum())


def test_kmeans_assign_matches_sklearn_predict():
    vectors, user_ids, _ = blobs()
    groups = fit_user_groups(vectors, user_ids, n_users=61, n_groups=4, method="kmeans", seed=3)
    reference = KMeans(n_clusters=4, init="k-means++", n_init=10, random_state=3).fit(vectors)
    np.testing.assert_array_equal(groups.labels[user_ids], reference.labels_)
    new = np.random.default_rng(1).uniform(-2, 12, size=(200, 3)).astype(np.float32)
    np.testing.assert_array_equal(groups.assign(new), reference.predict(new))
    np.testing.assert_array_equal(groups.assign(vectors), groups.labels[user_ids])


def test_gmm_assign_matches_sklearn_predict():
    vectors, user_ids, _ = blobs()
    groups = fit_user_groups(vectors, user_ids, n_users=61, n_groups=4, method="gmm", seed=3)
    x = vectors.astype(np.float64)
    reference = GaussianMixture(4, covariance_type="full", random_state=3, reg_covar=1e-4).fit(x)
    np.testing.assert_array_equal(groups.labels[user_ids], reference.predict(x))
    new = np.random.default_rng(1).uniform(-2, 12, size=(200, 3))
    np.testing.assert_array_equal(groups.assign(new), reference.predict(new))
    np.testing.assert_array_equal(groups.assign(vectors), groups.labels[user_ids])


@pytest.mark.parametrize("method", ["kmeans", "gmm", "random"])
def test_state_round_trip_through_torch_save(method, tmp_path):
    vectors, user_ids, _ = blobs()
    groups = fit_user_groups(vectors, user_ids, n_users=61, n_groups=3, method=method, seed=5)
    state = groups.to_state()
    assert all(isinstance(v, torch.Tensor | str | int) for v in state.values())
    assert all(v is not None for v in state.values())
    torch.save(state, tmp_path / "groups.pt")
    loaded = UserGroups.from_state(torch.load(tmp_path / "groups.pt", weights_only=True))
    np.testing.assert_array_equal(loaded.labels, groups.labels)
    assert loaded.labels.dtype == np.int64
    assert (loaded.n_groups, loaded.method, loaded.seed) == (groups.n_groups, method, 5)
    assert loaded.sizes() == groups.sizes()
    new = np.random.default_rng(2).uniform(-2, 12, size=(100, 3)).astype(np.float32)
    np.testing.assert_array_equal(loaded.assign(new), groups.assign(new))


def test_group_item_pools_by_hand():
    groups = UserGroups(labels=np.array([-1, 0, 1, 0, 1, -1]), n_groups=2, method="random", seed=0)
    user_ids = np.array([3, 1, 2, 5, 4])
    histories = np.array(
        [
            [4, 2, 0, 0],  # user 3, group 0
            [2, 7, 7, 0],  # user 1, group 0
            [1, 0, 0, 0],  # user 2, group 1
            [9, 8, 0, 0],  # user 5, not grouped: ignored
            [6, 3, 1, 5],  # user 4, group 1
        ]
    )
    pools = group_item_pools(groups, user_ids, histories, n_items=10)
    assert len(pools) == 2
    np.testing.assert_array_equal(pools[0], [2, 4, 7])
    np.testing.assert_array_equal(pools[1], [1, 3, 5, 6])
    assert all(p.dtype == np.int64 for p in pools)
    with pytest.raises(ValueError, match="item ids"):
        group_item_pools(groups, user_ids, histories, n_items=9)
