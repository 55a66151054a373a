"""Soft multi-interest users (beyond the paper, its limitation D.3.2): ``UserGroups.assign_soft`` (top-k
groups and weights by the grouping's own rule), what the groups file keeps for it, and PerPEFT's
``soft_groups``: k = 1 is the hard assignment exactly, k > 1 mixes the per-group scores by the weights
in evaluation and in ``recommend``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from recbole.data.interaction import Interaction
from recbole.utils import init_seed

from recbole_perpeft.grouping import UserGroups, fit_user_groups
from recbole_perpeft.model.sequential_recommender.perpeft import PerPEFT
from recbole_perpeft.trainer import PEFTTrainer
from recbole_perpeft.two_stage import group_users, stage_config
from tests.test_grouping import blobs
from tests.tiny import build_stage1_env

# --- the grouping ------------------------------------------------------------------------------------------


def fitted(method: str, n_groups: int = 3) -> tuple[UserGroups, np.ndarray, np.ndarray]:
    vectors, user_ids, _ = blobs()
    return fit_user_groups(vectors, user_ids, n_users=61, n_groups=n_groups, method=method, seed=3), vectors, user_ids


def between_blobs(n: int = 50) -> np.ndarray:
    """New users spread between the blobs, where soft weights are far from one-hot."""
    return np.random.default_rng(4).uniform(-2, 12, size=(n, 3)).astype(np.float32)


@pytest.mark.parametrize("method", ["kmeans", "gmm", "random"])
def test_k1_is_the_hard_assignment(method):
    groups, _, _ = fitted(method)
    new = between_blobs()
    top, weights = groups.assign_soft(new, 1)
    np.testing.assert_array_equal(top[:, 0], groups.assign(new))
    assert np.all(weights == 1.0)
    top, weights = groups.user_soft_groups(1)
    np.testing.assert_array_equal(top[:, 0], groups.labels)
    np.testing.assert_array_equal(weights[:, 0], (groups.labels >= 0).astype(np.float32))


@pytest.mark.parametrize("method", ["kmeans", "gmm"])
@pytest.mark.parametrize("k", [2, 3])
def test_weights_sum_to_one_most_first_and_top_group_is_the_users_own(method, k):
    groups, _, user_ids = fitted(method)
    top, weights = groups.assign_soft(between_blobs(), k)
    assert top.shape == weights.shape == (50, k) and top.dtype == np.int64 and weights.dtype == np.float32
    np.testing.assert_allclose(weights.sum(1), 1.0, rtol=1e-6)
    assert np.all(np.diff(weights, axis=1) <= 0) and np.all(weights >= 0)
    assert all(len(set(row)) == k for row in top.tolist())  # distinct groups
    np.testing.assert_array_equal(top[:, 0], groups.assign(between_blobs()))
    # Training users: from the vectors they were fitted on; their top group is the group they were put in.
    all_top, all_weights = groups.user_soft_groups(k)
    np.testing.assert_array_equal(all_top[user_ids, 0], groups.labels[user_ids])
    ungrouped = np.setdiff1d(np.arange(61), user_ids)
    assert np.all(all_top[ungrouped] == -1) and np.all(all_weights[ungrouped] == 0)
    if method == "kmeans":
        assert (all_weights[user_ids, 1] < 0.5).all()  # tight blobs: the own group dominates


def test_distance_weights_by_hand_and_scale_free():
    groups, _, _ = fitted("kmeans")
    new = between_blobs()
    sq = ((new[:, None, :].astype(np.float64) - groups.centers[None].astype(np.float64)) ** 2).sum(-1)
    for temperature in (None, 0.5, 3.0):
        tau = 1.0 if temperature is None else temperature
        logits = -sq / (tau * sq.min(1, keepdims=True))
        full = np.exp(logits - logits.max(1, keepdims=True))
        full /= full.sum(1, keepdims=True)
        top, weights = groups.assign_soft(new, 2, "distance", temperature)
        expected = np.take_along_axis(full, top, axis=1)
        np.testing.assert_allclose(weights, expected / expected.sum(1, keepdims=True), rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(top, np.argsort(-full, axis=1, kind="stable")[:, :2])
    # Rescaling the interest space (vectors and centres) leaves the weights unchanged.
    scaled = UserGroups(labels=groups.labels, n_groups=3, method="kmeans", seed=3, centers=groups.centers * 40)
    top, weights = groups.assign_soft(new, 3)
    top_s, weights_s = scaled.assign_soft(new * 40, 3)
    np.testing.assert_array_equal(top, top_s)
    np.testing.assert_allclose(weights, weights_s, rtol=1e-5, atol=1e-7)
    # A lower temperature is sharper; a user exactly on a centre keeps its group alone.
    assert (groups.assign_soft(new, 3, temperature=0.2)[1][:, 0] >= weights[:, 0] - 1e-6).all()
    on_centre = groups.assign_soft(groups.centers[:1], 3)
    assert on_centre[0][0, 0] == 0 and on_centre[1][0, 0] == 1.0


def test_posterior_weights_are_the_gmm_posterior():
    groups, _, _ = fitted("gmm")
    new = between_blobs()
    posterior = groups._gaussian_mixture().predict_proba(new.astype(np.float64))
    top, weights = groups.assign_soft(new, 3, "posterior")
    np.testing.assert_allclose(weights, np.take_along_axis(posterior, top, axis=1), atol=1e-6)
    top2, weights2 = groups.assign_soft(new, 2)  # ~: the grouping's own rule, here the posterior
    kept = np.take_along_axis(posterior, top2, axis=1)
    np.testing.assert_allclose(weights2, kept / kept.sum(1, keepdims=True), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "method, k, weighting, temperature, message",
    [
        ("kmeans", 0, None, None, "soft_groups=0 is invalid"),
        ("kmeans", 4, None, None, "between 1"),
        ("kmeans", 2.0, None, None, "soft_groups=2.0"),
        ("kmeans", True, None, None, "soft_groups=True"),
        ("kmeans", 2, "posterior", None, "set soft_group_weighting: distance"),
        ("gmm", 2, "distance", None, "set soft_group_weighting: posterior"),
        ("random", 2, None, None, "grouping_method 'random' has none"),
        ("kmeans", 2, "cosine", None, "Unknown soft_group_weighting 'cosine'"),
        ("kmeans", 1, "cosine", None, "Unknown soft_group_weighting"),
        ("kmeans", 2, None, 0, "soft_group_temperature must be a positive number"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(method, k, weighting, temperature, message):
    groups, _, _ = fitted(method)
    with pytest.raises(ValueError, match=message):
        groups.assign_soft(between_blobs(), k, weighting, temperature)


def test_groups_file_keeps_the_fitted_vectors_and_old_files_still_load(tmp_path):
    groups, vectors, user_ids = fitted("kmeans")
    np.testing.assert_array_equal(groups.interest_vectors[user_ids], vectors)
    torch.save(groups.to_state(), tmp_path / "groups.pt")
    loaded = UserGroups.from_state(torch.load(tmp_path / "groups.pt", weights_only=True))
    for a, b in zip(loaded.user_soft_groups(2), groups.user_soft_groups(2), strict=True):
        np.testing.assert_array_equal(a, b)
    old = {k: v for k, v in groups.to_state().items() if k != "interest_vectors"}  # before soft groups
    torch.save(old, tmp_path / "old.pt")
    old_groups = UserGroups.from_state(torch.load(tmp_path / "old.pt", weights_only=True))
    assert old_groups.interest_vectors is None
    np.testing.assert_array_equal(old_groups.user_soft_groups(1)[0][:, 0], groups.labels)
    np.testing.assert_array_equal(old_groups.assign(between_blobs()), groups.assign(between_blobs()))
    with pytest.raises(ValueError, match="saved without the interest vectors"):
        old_groups.user_soft_groups(2)


# --- PerPEFT ------------------------------------------------------------------------------------------------

N_GROUPS = 3


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Stage 1 on a tiny dataset, regrouped into 3 groups (kmeans and gmm) so that k=2 is a real top-k."""
    env = build_stage1_env(tmp_path_factory.mktemp("soft"), "PerPEFT", "softds", 40, 40)
    for method in ("kmeans", "gmm"):
        config = stage_config(env.config, "PerPEFT", 1, n_groups=N_GROUPS, grouping_method=method)
        setattr(env, method, group_users(env.global_model, env.train_dataset, config))
        assert getattr(env, method).n_groups == N_GROUPS
    return env


def build(env, method="kmeans", state=None, **keys) -> PerPEFT:
    """PerPEFT from the stage-1 model; every group's projector then moved apart (a stand-in for stage 2,
    which would make the groups' tables differ), or ``state`` loaded."""
    config = stage_config(env.config, "PerPEFT", 1, n_groups=N_GROUPS, grouping_method=method, **keys)
    init_seed(config["seed"], True)
    model = PerPEFT(config, env.train_dataset)
    model.load_global(env.global_model.state_dict(), getattr(env, method))
    if state is None:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for projector in model.item_tower.group_projectors:
                for p in projector.parameters():
                    p.add_(0.3 * torch.randn(p.shape, generator=generator))
    else:
        model.load_state_dict(state)
    return model.eval()


@pytest.fixture(scope="module")
def hard(env):
    return build(env)


def per_group_scores(model, interaction) -> list[torch.Tensor]:
    return [model.scores(interaction, g) for g in range(N_GROUPS)]


def test_k1_scores_are_todays_per_group_scores_exactly(env, hard):
    interaction = next(iter(env.test_data))[0]
    groups = hard.group_of_user[interaction[hard.USER_ID]]
    assert len(groups.unique()) == N_GROUPS
    expected = torch.empty(len(groups), hard.n_items)
    for g in range(N_GROUPS):
        rows = torch.nonzero(groups == g).flatten()
        expected[rows] = hard.scores(interaction[rows], g)
    scores = hard.full_sort_predict(interaction)
    assert torch.equal(scores, expected)
    # The mixing code with one group of weight 1 gives the same numbers bit for bit.
    assert torch.equal(hard.mixed_scores(interaction, groups[:, None], torch.ones(len(groups), 1)), scores)
    assert not hasattr(hard, "soft_group_of_user")


@pytest.mark.parametrize("k", [2, 3])
def test_k_scores_are_the_weighted_mix_of_the_groups_scores(env, hard, k):
    soft = build(env, state=hard.state_dict(), soft_groups=k)
    assert soft.state_dict().keys() == hard.state_dict().keys()  # checkpoints do not depend on k
    interaction = next(iter(env.test_data))[0]
    users = interaction[soft.USER_ID].numpy()
    top, weights = env.kmeans.user_soft_groups(k)
    top, weights = top[users], weights[users]
    np.testing.assert_array_equal(top[:, 0], env.kmeans.labels[users])
    assert (weights[:, 1] > 1e-3).any()  # a real mix for some users
    per_group = per_group_scores(hard, interaction)
    expected = torch.stack([
        sum(float(weights[row, j]) * per_group[top[row, j]][row] for j in range(k)) for row in range(len(users))
    ])  # fmt: skip
    scores = soft.full_sort_predict(interaction)
    torch.testing.assert_close(scores, expected)
    assert not torch.allclose(scores, hard.full_sort_predict(interaction))
    interaction[soft.ITEM_ID] = torch.arange(len(users)) % (soft.n_items - 1) + 1
    torch.testing.assert_close(soft.predict(interaction), scores.gather(1, interaction[soft.ITEM_ID][:, None])[:, 0])


def test_recommend_ranks_a_new_history_by_the_mix(env, hard):
    soft = build(env, state=hard.state_dict(), soft_groups=2)
    max_len = soft.max_seq_length
    for history in ([3, 7, 12, 5], [20, 21, 22, 23, 24, 25, 26], list(range(1, 16))):
        items, group = soft.recommend(history, k=5)
        seq = torch.tensor(history[-max_len:])[None]
        interest = soft.interest_vectors(seq, torch.tensor([seq.shape[1]])).numpy()
        top, weights = env.kmeans.assign_soft(interest, 2)
        batch = Interaction({soft.ITEM_SEQ: seq, soft.ITEM_SEQ_LEN: torch.tensor([seq.shape[1]])})
        mix = sum(float(weights[0, j]) * hard.scores(batch, int(top[0, j]))[0] for j in range(2))
        mix[0] = -torch.inf
        assert group == int(top[0, 0]) == hard.recommend(history, k=5)[1]
        assert items == torch.topk(mix, 5).indices.tolist()


def test_posterior_weighting_with_gmm_groups_evaluates(env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    soft = build(env, method="gmm", soft_groups=2, soft_group_weighting="posterior")
    users = torch.arange(1, env.train_dataset.user_num)
    vectors = env.gmm.interest_vectors[users.numpy()].astype(np.float64)
    posterior = env.gmm._gaussian_mixture().predict_proba(vectors)
    top = soft.soft_group_of_user[users].numpy()
    kept = np.take_along_axis(posterior, top, axis=1)
    np.testing.assert_allclose(soft.soft_weight_of_user[users].numpy(), kept / kept.sum(1, keepdims=True),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    config = stage_config(env.config, "PerPEFT", 1, n_groups=N_GROUPS, grouping_method="gmm", soft_groups=2)
    result = PEFTTrainer(config, soft).evaluate(env.test_data, load_best_model=False, show_progress=False)
    assert set(result) >= {"hit@5", "ndcg@10"} and all(0 <= v <= 1 for v in result.values())


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"soft_groups": 0}, "soft_groups=0 is invalid"),
        ({"soft_groups": 4}, "n_groups=3"),
        ({"soft_groups": 2, "soft_group_weighting": "posterior"}, "grouping_method kmeans"),
        ({"soft_groups": 2, "grouping_method": "random"}, "'random' has none"),
    ],
)
def test_perpeft_refuses_bad_soft_settings_when_built(env, keys, message):
    config = stage_config(env.config, "PerPEFT", 1, n_groups=N_GROUPS, **keys)
    with pytest.raises(ValueError, match=message):
        PerPEFT(config, env.train_dataset)


def test_old_groups_file_loads_hard_and_refuses_soft(env, hard):
    old = UserGroups.from_state({k: v for k, v in env.kmeans.to_state().items() if k != "interest_vectors"})
    hard.set_groups(old)  # k = 1: as before
    hard.set_groups(env.kmeans)
    config = stage_config(env.config, "PerPEFT", 1, n_groups=N_GROUPS, soft_groups=2)
    soft = PerPEFT(config, env.train_dataset)
    with pytest.raises(ValueError, match="soft_groups: 1"):
        soft.set_groups(old)
