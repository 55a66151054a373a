"""Group-wise negatives (PerPEFT §3.3.4) and group-homogeneous training batches (§3.3.2)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from recbole.data.interaction import Interaction
from recbole.trainer import Trainer

from recbole_perpeft.data import create_dataset, data_preparation
from recbole_perpeft.data.dataloader import (
    GROUP_ID,
    NEG_LIST,
    TARGET_LIST,
    GroupedUserSequenceDataLoader,
    UserSequenceDataLoader,
)
from recbole_perpeft.data.sampler import GroupNegativeSampler, SequenceNegativeSampler
from recbole_perpeft.grouping import UserGroups, training_item_pools
from recbole_perpeft.utils import get_model

# --- GroupNegativeSampler ---------------------------------------------------------------------------


@st.composite
def group_cases(draw):
    n_items = draw(st.integers(3, 30))
    n_groups = draw(st.integers(1, 4))
    pools = [sorted(draw(st.sets(st.integers(1, n_items - 1), max_size=n_items))) for _ in range(n_groups)]
    group = draw(st.integers(0, n_groups - 1))
    batch, length = draw(st.integers(1, 6)), draw(st.integers(1, 12))
    rows = []
    for _ in range(batch):
        # Often a row that swallows the whole pool (the fallback case); always one real item left out.
        covers_pool = bool(pools[group]) and draw(st.booleans())
        outside = [i for i in range(1, n_items) if i not in pools[group]]
        free = draw(st.sampled_from(outside if covers_pool and outside else list(range(1, n_items))))
        items = st.integers(0, n_items - 1).filter(lambda i, f=free: i != f)
        row = draw(st.lists(items, min_size=length, max_size=length))
        if covers_pool and free not in pools[group]:
            row += pools[group]
        rows.append(row)
    width = max(len(r) for r in rows)
    rows = [r + [0] * (width - len(r)) for r in rows]
    num, seed = draw(st.integers(1, 12)), draw(st.integers(0, 2**31))
    return n_items, [np.array(p, dtype=np.int64) for p in pools], group, torch.tensor(rows), num, seed


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(group_cases())
def test_group_negatives_come_from_the_pool_and_avoid_history(case):
    n_items, pools, group, history, num, seed = case
    negatives = GroupNegativeSampler(n_items, seed, pools).sample(history, num, group=group)
    assert negatives.shape == (history.shape[0], num) and negatives.dtype == torch.long
    assert (negatives != 0).all()
    pool = set(pools[group].tolist())
    for row, negs in zip(history.tolist(), negatives.tolist(), strict=True):
        assert not set(negs) & set(row)
        if pool - set(row):
            assert set(negs) <= pool
        else:  # documented fallback: every item (but still none of the user's own)
            assert set(negs) <= set(range(1, n_items))
    again = GroupNegativeSampler(n_items, seed, pools).sample(history, num, group=group)
    assert torch.equal(negatives, again)


def test_fallback_warns_naming_the_group_and_draws_outside_the_pool(caplog):
    pools = [np.array([1, 2, 3]), np.array([4, 5])]
    history = torch.tensor([[4, 5, 0], [1, 4, 0]])  # user 0 owns group 1's whole pool, user 1 does not
    sampler = GroupNegativeSampler(12, seed=0, pools=pools)
    with caplog.at_level(logging.WARNING):
        negatives = sampler.sample(history, 30, group=1)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Group 1" in warnings[0].getMessage()
    assert set(negatives[0].tolist()) <= set(range(1, 12)) - {4, 5}
    assert len(set(negatives[0].tolist())) > 1  # drawn from all the other items, not one fixed item
    assert set(negatives[1].tolist()) == {5}  # the only pool item outside user 1's sequence
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        sampler.sample(history, 3, group=1)  # reported once per group
        sampler.sample(torch.tensor([[1, 2, 3]]), 3, group=0)
    assert [r.getMessage()[:7] for r in caplog.records] == ["Group 0"]


def test_empty_pool_falls_back_to_all_items(caplog):
    sampler = GroupNegativeSampler(8, seed=3, pools=[np.array([], dtype=np.int64), np.array([2])])
    with caplog.at_level(logging.WARNING):
        negatives = sampler.sample(torch.tensor([[1, 2, 0]]), 10, group=0)
    assert "Group 0" in caplog.text
    assert set(negatives[0].tolist()) <= {3, 4, 5, 6, 7}


def test_no_negative_at_all_still_raises():
    sampler = GroupNegativeSampler(4, seed=0, pools=[np.array([1, 2])])
    with pytest.raises(ValueError, match="every candidate"):
        sampler.sample(torch.tensor([[1, 2, 3]]), 2, group=0)


def test_bad_pools_and_groups():
    with pytest.raises(ValueError, match="group 1"):
        GroupNegativeSampler(5, seed=0, pools=[np.array([1]), np.array([0, 2])])
    with pytest.raises(ValueError, match="group 1"):
        GroupNegativeSampler(5, seed=0, pools=[np.array([1]), np.array([5])])
    with pytest.raises(ValueError, match="Group 2"):
        GroupNegativeSampler(5, seed=0, pools=[np.array([1]), np.array([2])]).sample(torch.tensor([[3]]), 1, group=2)


def test_group_sampler_is_seeded():
    pools = [np.arange(1, 40), np.arange(20, 60)]
    history = torch.tensor([[21, 22, 0], [30, 31, 32]])
    a, b = GroupNegativeSampler(60, 1, pools), GroupNegativeSampler(60, 1, pools)
    first = a.sample(history, 25, group=1)
    assert torch.equal(first, b.sample(history, 25, group=1))
    assert not torch.equal(first, a.sample(history, 25, group=1))  # the generator advances
    assert not torch.equal(first, GroupNegativeSampler(60, 2, pools).sample(history, 25, group=1))


def test_group_none_is_the_plain_sampler_and_the_plain_sampler_ignores_group():
    history = torch.tensor([[1, 2, 0], [3, 4, 5]])
    plain = SequenceNegativeSampler(50, 7).sample(history, 20)
    assert torch.equal(GroupNegativeSampler(50, 7, [np.array([6, 7])]).sample(history, 20), plain)
    assert torch.equal(SequenceNegativeSampler(50, 7).sample(history, 20, group=3), plain)


# --- GroupedUserSequenceDataLoader --------------------------------------------------------------------

BATCH = 4
MAX_LEN = 7
N_GROUPS = 3


def train_dataset(data, toy_config, **overrides):
    config = toy_config("GlobalPEFT", data, MAX_ITEM_LIST_LENGTH=MAX_LEN, train_batch_size=BATCH, **overrides)
    dataset = create_dataset(config)
    train_data, _, _ = data_preparation(config, dataset, get_model("GlobalPEFT"))
    return config, train_data._dataset


def groups_by_modulo(dataset) -> np.ndarray:
    group_of_user = np.arange(dataset.user_num) % N_GROUPS
    group_of_user[0] = -1  # padding user
    return group_of_user


@pytest.fixture
def grouped(build_toy_dataset, toy_config):
    """60 items, so a group's pool is a strict subset of the items."""
    data = build_toy_dataset(n_items=60, images=False)
    config, dataset = train_dataset(data, toy_config)
    return data, config, dataset, groups_by_modulo(dataset)


def make_loader(config, dataset, group_of_user, shuffle=True, sampler=None):
    if sampler is None:
        pools = training_item_pools(dataset, UserGroups(group_of_user, N_GROUPS, 'random', 0))
        sampler = GroupNegativeSampler(dataset.item_num, config["seed"], pools)
    return GroupedUserSequenceDataLoader(config, dataset, sampler, group_of_user, shuffle=shuffle)


def epoch_batches(loader) -> list[tuple[int, list[int]]]:
    """(group, users) of each batch of one epoch, checking group homogeneity and GROUP_ID."""
    out = []
    for batch in loader:
        assert isinstance(batch, Interaction)
        users, group_ids = batch["user_id"], batch[GROUP_ID]
        assert group_ids.dtype == torch.int64 and group_ids.shape == users.shape
        assert len(set(group_ids.tolist())) == 1
        assert torch.equal(group_ids, torch.from_numpy(loader.row_group[np.searchsorted(loader_users(loader), users)]))
        out.append((int(group_ids[0]), users.tolist()))
    return out


def loader_users(loader) -> np.ndarray:
    return loader.user_data["user_id"].numpy()


def test_group_item_pools_are_the_groups_training_items(grouped):
    data, _, dataset, group_of_user = grouped
    tokens = dataset.field2id_token
    item_of = {token: i for i, token in enumerate(tokens["item_id"])}
    pools = training_item_pools(dataset, UserGroups(group_of_user, N_GROUPS, 'random', 0))
    for group in range(N_GROUPS):
        expected = set()
        for user in range(1, dataset.user_num):
            if group_of_user[user] == group:
                expected |= {item_of[t] for t in data.sequences[tokens["user_id"][user]][:-2]}
        assert set(pools[group].tolist()) == expected
        assert 0 < len(expected) < dataset.item_num - 1  # a strict subset: the pool test below means something


def test_batches_are_group_homogeneous_and_cover_each_user_once(grouped):
    _, config, dataset, group_of_user = grouped
    loader = make_loader(config, dataset, group_of_user)
    sizes = np.bincount(group_of_user[1:], minlength=N_GROUPS)
    assert len(loader) == sum(-(-int(s) // BATCH) for s in sizes) == 9  # 10 users per group -> 3 batches each
    for _ in range(3):
        batches = epoch_batches(loader)
        assert len(batches) == len(loader)
        users = [u for _, us in batches for u in us]
        assert sorted(users) == list(range(1, dataset.user_num))
        assert all(len(us) <= BATCH for _, us in batches)
        assert all((group_of_user[us] == g).all() for g, us in batches)
        groups = [g for g, _ in batches]
        changes = sum(a != b for a, b in zip(groups, groups[1:], strict=False))
        assert changes > N_GROUPS - 1  # the groups' batches are interleaved, not in blocks


def test_order_changes_between_epochs_and_repeats_with_the_seed(grouped, toy_config):
    data, config, dataset, group_of_user = grouped

    def run(config, epochs=3):
        loader = make_loader(config, dataset, group_of_user)
        return [[(b["user_id"].tolist(), b[NEG_LIST].tolist()) for b in loader] for _ in range(epochs)]

    def users(epochs):
        return [[u for u, _ in epoch] for epoch in epochs]

    first = run(config)
    assert len(set(map(str, users(first)))) == 3  # every epoch has its own order
    assert run(config) == first  # a new loader with the same seed: same users and negatives, epoch by epoch
    other = toy_config("GlobalPEFT", data, MAX_ITEM_LIST_LENGTH=MAX_LEN, train_batch_size=BATCH, seed=7)
    assert users(run(other)) != users(first)


def test_without_shuffle_groups_come_in_order(grouped):
    _, config, dataset, group_of_user = grouped
    loader = make_loader(config, dataset, group_of_user, shuffle=False)
    expected = []
    for group in range(N_GROUPS):
        users = [u for u in range(1, dataset.user_num) if group_of_user[u] == group]
        expected += [(group, users[i : i + BATCH]) for i in range(0, len(users), BATCH)]
    assert epoch_batches(loader) == expected
    assert epoch_batches(loader) == expected


def test_negatives_come_from_the_batch_groups_pool(grouped):
    _, config, dataset, group_of_user = grouped
    pools = training_item_pools(dataset, UserGroups(group_of_user, N_GROUPS, 'random', 0))
    loader = make_loader(config, dataset, group_of_user)
    seen = set()
    for batch in loader:
        group = int(batch[GROUP_ID][0])
        seen.add(group)
        negs = batch[NEG_LIST]
        assert negs.shape == batch["item_id_list"].shape and (negs > 0).all()
        assert set(negs.reshape(-1).tolist()) <= set(pools[group].tolist())
        for row in range(len(batch)):
            own = set(batch["item_id_list"][row].tolist()) | set(batch[TARGET_LIST][row].tolist())
            assert not set(negs[row].tolist()) & own
    assert seen == set(range(N_GROUPS))


def test_plain_sampler_gives_negatives_over_all_items(grouped):
    """Ablation V3 (group negatives off): same batches, negatives from every item."""
    _, config, dataset, group_of_user = grouped
    pools = training_item_pools(dataset, UserGroups(group_of_user, N_GROUPS, 'random', 0))
    loader = make_loader(config, dataset, group_of_user, sampler=SequenceNegativeSampler(dataset.item_num, 0))
    outside = 0
    for batch in loader:
        negs = set(batch[NEG_LIST].reshape(-1).tolist())
        outside += len(negs - set(pools[int(batch[GROUP_ID][0])].tolist()))
    assert outside > 0


def test_the_parent_loader_is_unchanged(grouped):
    _, config, dataset, _ = grouped
    loader = UserSequenceDataLoader(config, dataset, SequenceNegativeSampler(dataset.item_num, 0))
    batches = list(loader)
    assert GROUP_ID not in batches[0] and len(loader) == len(batches) == -(-(dataset.user_num - 1) // BATCH)


def test_a_user_without_group_is_an_error(grouped):
    _, config, dataset, group_of_user = grouped
    missing = group_of_user.copy()
    missing[[4, 9]] = -1
    with pytest.raises(ValueError, match="2 user"):
        make_loader(config, dataset, missing, sampler=SequenceNegativeSampler(dataset.item_num, 0))
    with pytest.raises(ValueError, match="group_of_user has"):
        make_loader(config, dataset, group_of_user[:5], sampler=SequenceNegativeSampler(dataset.item_num, 0))


@pytest.mark.filterwarnings("ignore:`torch.cuda.amp.GradScaler:FutureWarning")
def test_recbole_trainer_trains_an_epoch_on_it(grouped, in_tmp_path):
    _, config, dataset, group_of_user = grouped
    loader = make_loader(config, dataset, group_of_user)

    class GroupScale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(N_GROUPS))
            self.seen = []

        def calculate_loss(self, interaction):
            group = interaction[GROUP_ID]
            self.seen.append(interaction["user_id"].tolist())
            return (self.scale[group] * interaction[NEG_LIST].float().mean(dim=1)).mean()

    model = GroupScale()
    trainer = Trainer(config, model)
    loss = trainer._train_epoch(loader, 0)
    assert isinstance(loss, float)
    assert len(model.seen) == len(loader)
    assert sorted(u for users in model.seen for u in users) == list(range(1, dataset.user_num))
    assert (model.scale != 1).all()  # every group's parameter was trained
