"""``train_windows: all`` (data/dataloader.py): every window of a long history, read from RecBole's augmented
train split, with ``train_window_stride``; the grouped loader gives each window its user's group; negatives
avoid the window's items; resume state; ``last`` stays each user's last window."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from recbole_perpeft.data import create_dataset
from recbole_perpeft.data.dataloader import (
    GROUP_ID,
    NEG_LIST,
    SHARED_NEGATIVES,
    TARGET_LIST,
    GroupedUserSequenceDataLoader,
    UserSequenceDataLoader,
    user_sequences,
)
from recbole_perpeft.data.sampler import GroupNegativeSampler, SequenceNegativeSampler
from tests.conftest import build_atomic_dataset, config_for

MAX_LEN, N_GROUPS = 3, 3


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("windows")
    data = build_atomic_dataset(root / "data", n_items=40, images=False)  # 8-12 items a user: 6-10 for training
    base = {"checkpoint_dir": str(root / "saved"), "cache_dir": str(root / "cache"), "show_progress": False,
            "device": "cpu", "use_gpu": False, "state": "WARNING"}  # fmt: skip
    config = config_for("GlobalPEFT", data, base, MAX_ITEM_LIST_LENGTH=MAX_LEN, train_batch_size=4)
    train, _, _ = create_dataset(config).build()
    tokens = train.field2id_token
    item_id = {t: i for i, t in enumerate(tokens["item_id"])}
    # Leave-one-out: all but each user's last two items are training items.
    history = {u: [item_id[t] for t in data.sequences[tokens["user_id"][u]][:-2]] for u in range(1, train.user_num)}
    group_of_user = np.arange(train.user_num) % N_GROUPS
    group_of_user[0] = -1
    return SimpleNamespace(config=config, train=train, history=history, group_of_user=group_of_user, data=data,
                           base=base)  # fmt: skip


def with_keys(config, **keys):
    for key, value in keys.items():
        config[key] = value
    return config


@pytest.fixture
def config(toy):
    """The module's config, restored after each test (tests set train_windows and friends on it)."""
    saved = dict(toy.config.final_config_dict)
    yield toy.config
    toy.config.final_config_dict = saved


def expected_windows(history: dict, stride: int) -> list[tuple[int, list[int], list[int]]]:
    """(user, inputs, targets) of every window, by hand: ends at the last training item, then ``stride``
    earlier, while a target is left; inputs the up to MAX_LEN items before the end, targets shifted by one."""
    windows = []
    for user, items in sorted(history.items()):
        ends = range(len(items) - 1, 0, -stride)
        for end in sorted(ends):
            start = max(0, end - MAX_LEN)
            windows.append((user, items[start:end], items[start + 1 : end + 1]))
    return windows


def loader_windows(loader) -> list[tuple[int, list[int], list[int]]]:
    data = loader.user_data
    rows = []
    for row in range(len(data)):
        length = int(data["item_length"][row])
        seq, targets = data["item_id_list"][row], data[TARGET_LIST][row]
        assert not seq[length:].any() and not targets[length:].any()  # left-aligned, zero-padded
        rows.append((int(data["user_id"][row]), seq[:length].tolist(), targets[:length].tolist()))
    return rows


@pytest.mark.parametrize("stride", [None, 1, 2, 5])
def test_all_windows_are_the_hand_computed_ones(toy, config, stride):
    with_keys(config, train_windows="all", train_window_stride=stride)
    loader = UserSequenceDataLoader(config, toy.train, SequenceNegativeSampler(toy.train.item_num, 0))
    step = stride or MAX_LEN
    expected = expected_windows(toy.history, step)
    assert loader_windows(loader) == expected
    assert loader.sample_size == sum(math.ceil((len(h) - 1) / step) for h in toy.history.values())
    if stride == 1:  # every prefix: the augmented train split itself
        assert loader.sample_size == len(toy.train.inter_feat)


def test_default_stride_covers_every_target_once(toy, config):
    """Non-overlapping windows: every training item but a user's first is a target exactly once."""
    with_keys(config, train_windows="all", train_window_stride=None)
    loader = UserSequenceDataLoader(config, toy.train, SequenceNegativeSampler(toy.train.item_num, 0))
    targets = {}
    for user, _, window_targets in loader_windows(loader):
        targets.setdefault(user, []).extend(window_targets)
    assert {u: sorted(t) for u, t in targets.items()} == {u: sorted(h[1:]) for u, h in toy.history.items()}
    assert max(len(h) for h in toy.history.values()) > 2 * MAX_LEN + 1  # some user has 3+ windows
    assert any(len(inputs) < MAX_LEN for _, inputs, _ in loader_windows(loader))  # earliest ones shorter


def test_last_is_each_users_last_window_and_the_default(toy, config):
    plain = UserSequenceDataLoader(config, toy.train, SequenceNegativeSampler(toy.train.item_num, 0))
    assert config["train_windows"] == "last"  # properties/model/GlobalPEFT.yaml
    assert loader_windows(plain) == expected_windows(toy.history, 10**6)  # one window a user: the last
    reference = user_sequences(toy.train)
    assert all(torch.equal(plain.user_data[k], reference[k]) for k in reference.columns)
    with_keys(config, train_windows="LAST", train_window_stride=2)  # the stride only applies to `all`
    explicit = UserSequenceDataLoader(config, toy.train, SequenceNegativeSampler(toy.train.item_num, 0))
    for a, b in zip(plain, explicit, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a.columns)


def test_batches_cover_every_window_and_negatives_avoid_the_windows_items(toy, config):
    with_keys(config, train_windows="all", train_window_stride=2)
    loader = UserSequenceDataLoader(config, toy.train, SequenceNegativeSampler(toy.train.item_num, 0))
    seen = []
    for batch in loader:
        seq, targets, negs = batch["item_id_list"], batch[TARGET_LIST], batch[NEG_LIST]
        assert negs.shape == seq.shape and (negs > 0).all()
        for row in range(len(batch)):
            length = int(batch["item_length"][row])
            seen.append((int(batch["user_id"][row]), seq[row, :length].tolist(), targets[row, :length].tolist()))
            assert not set(negs[row].tolist()) & (set(seq[row].tolist()) | set(targets[row].tolist()))
    assert sorted(seen) == sorted(expected_windows(toy.history, 2))


def test_grouped_windows_carry_their_users_group_and_draw_from_its_pool(toy, config):
    with_keys(config, train_windows="all", train_window_stride=None)
    pools = [np.arange(1 + g, toy.train.item_num, N_GROUPS) for g in range(N_GROUPS)]
    sampler = GroupNegativeSampler(toy.train.item_num, 0, pools)
    loader = GroupedUserSequenceDataLoader(config, toy.train, sampler, toy.group_of_user)
    users = []
    for batch in loader:
        group = int(batch[GROUP_ID][0])
        assert (batch[GROUP_ID] == group).all()
        assert (toy.group_of_user[batch["user_id"].numpy()] == group).all()
        negs = batch[NEG_LIST]
        fallback = torch.isin(negs, torch.from_numpy(pools[group]), invert=True)
        assert not fallback.any()  # every window has pool items outside its own
        users += batch["user_id"].tolist()
    assert sorted(users) == sorted(u for u, _, _ in expected_windows(toy.history, MAX_LEN))


@pytest.mark.parametrize(("grouped", "loss_type"), [(False, "BCE"), (True, "BCE"), (True, "SAMPLED_SOFTMAX")])
def test_loader_state_reproduces_the_next_epoch(toy, config, grouped, loss_type):
    with_keys(config, train_windows="all", train_window_stride=2, loss_type=loss_type, sampled_softmax_negatives=5)
    negatives = SHARED_NEGATIVES if loss_type == "SAMPLED_SOFTMAX" else NEG_LIST

    def make():
        sampler = SequenceNegativeSampler(toy.train.item_num, 0)
        if grouped:
            return GroupedUserSequenceDataLoader(config, toy.train, sampler, toy.group_of_user)
        return UserSequenceDataLoader(config, toy.train, sampler)

    def epoch(loader):
        return [(b["user_id"].tolist(), b["item_id_list"].tolist(), b[negatives].tolist()) for b in loader]

    first = make()
    epoch1 = epoch(first)
    state = first.state_dict()
    epoch2 = epoch(first)
    resumed = make()
    resumed.load_state_dict(state)
    assert epoch(resumed) == epoch2 != epoch1


@pytest.mark.parametrize(
    ("keys", "message"),
    [({"train_windows": "every"}, "train_windows must be one of last, all"),
     ({"train_windows": "all", "train_window_stride": 0}, "train_window_stride must be a positive integer"),
     ({"train_windows": "all", "train_window_stride": 1.5}, "train_window_stride must be a positive integer")],
)  # fmt: skip
def test_bad_values_name_the_key(toy, config, keys, message):
    with_keys(config, **keys)
    with pytest.raises(ValueError, match=message):
        UserSequenceDataLoader(config, toy.train, SequenceNegativeSampler(toy.train.item_num, 0))


def test_command_line_keys_are_known(toy):
    # Declared in properties/model/GlobalPEFT.yaml: accepted on the command line, with their defaults.
    config = config_for("WithoutMM", toy.data, toy.base, train_windows="all", train_window_stride=4)
    assert config["train_windows"] == "all" and config["train_window_stride"] == 4
