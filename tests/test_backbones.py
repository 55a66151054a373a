"""Backbone recommenders (model/backbones): registry, SASRec as GlobalPEFT inlined it, LightGCN's graph,
propagation and gradients, and the (user, item) pair loaders LightGCN trains on."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from recbole.data.interaction import Interaction
from torch import nn

from recbole_perpeft.data import create_dataset
from recbole_perpeft.data.dataloader import GROUP_ID, NEG_LIST, TARGET_LIST
from recbole_perpeft.data.pair_loader import GroupedUserItemPairDataLoader, UserItemPairDataLoader, training_pairs
from recbole_perpeft.data.sampler import GroupNegativeSampler, SequenceNegativeSampler
from recbole_perpeft.grouping import UserGroups, training_item_pools
from recbole_perpeft.model import backbones
from recbole_perpeft.model.backbones import Backbone, build_backbone, get_backbone, register_backbone
from recbole_perpeft.model.backbones.lightgcn import LightGCNBackbone, normalized_adjacency
from recbole_perpeft.model.backbones.sasrec import SASRecBackbone
from recbole_perpeft.model.sequence_encoder import SASRecEncoder
from tests.conftest import build_atomic_dataset, config_for

MAX_LEN, HIDDEN, N_GROUPS, PAIR_BATCH = 5, 8, 3, 16


class FakeConfig(dict):
    def __missing__(self, key):  # RecBole's Config answers None for keys it lacks
        return None


# --- a hand-made graph: 3 users, 4 items, as RecBole's augmented train split holds it ----------------

HAND_HISTORY = {1: [1, 2, 3], 2: [2, 4], 3: [3, 1, 2, 4]}  # user -> training sequence
HAND_DEGREE = {"u1": 3, "u2": 2, "u3": 4, "i1": 2, "i2": 3, "i3": 2, "i4": 2}


def hand_dataset():
    """Every prefix is a row (list of its last 2 items, target = next item): pairs repeat across rows."""
    users, lists, targets = [], [], []
    for user, seq in HAND_HISTORY.items():
        for t in range(1, len(seq)):
            prefix = seq[max(0, t - 2) : t]
            users.append(user), lists.append(prefix + [0] * (2 - len(prefix))), targets.append(seq[t])
    feat = Interaction({"user_id": torch.tensor(users), "item_id": torch.tensor(targets),
                        "item_id_list": torch.tensor(lists)})  # fmt: skip
    return SimpleNamespace(inter_feat=feat, uid_field="user_id", iid_field="item_id",
                           item_id_list_field="item_id_list", user_num=4, item_num=5)  # fmt: skip


def hand_lightgcn(n_layers=3, reg_weight=0.1):
    config = FakeConfig(USER_ID_FIELD="user_id", ITEM_ID_FIELD="item_id", hidden_size=3, initializer_range=0.5,
                        n_gcn_layers=n_layers, reg_weight=reg_weight, backbone="LightGCN")  # fmt: skip
    return LightGCNBackbone(config, hand_dataset())


def test_registry_finds_builtins_and_names_the_known_ones(monkeypatch):
    assert get_backbone("SASRec") is SASRecBackbone and get_backbone("lightgcn") is LightGCNBackbone
    assert get_backbone(None) is SASRecBackbone and LightGCNBackbone.name == "LightGCN"
    with pytest.raises(ValueError, match="Unknown backbone 'GRU4Rec': known backbones are .*LightGCN.*SASRec"):
        get_backbone("GRU4Rec")  # (other tests may have registered more)
    monkeypatch.setattr(backbones, "BACKBONES", dict(backbones.BACKBONES))
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("SASRec")(type("Other", (Backbone,), {}))
    with pytest.raises(TypeError):
        register_backbone("Plain")(nn.Module)
    mine = register_backbone("Mine")(type("Mine", (Backbone,), {}))
    assert get_backbone("Mine") is mine and mine.name == "Mine"
    assert isinstance(build_backbone(hand_lightgcn().config, hand_dataset()), LightGCNBackbone)


@pytest.mark.parametrize("key,asked,neutral", [("loss_positions", "last", "all"), ("train_windows", "all", "last")])
def test_lightgcn_refuses_sasrec_window_keys_naming_the_key(key, asked, neutral):
    """loss_positions and train_windows shape SASRec's windows; LightGCN has none, so a non-default value
    would be silently ignored and a table row mislabelled."""
    hand_lightgcn()  # keys absent (None): the defaults
    config = FakeConfig(USER_ID_FIELD="user_id", ITEM_ID_FIELD="item_id", hidden_size=3, initializer_range=0.5,
                        n_gcn_layers=1, reg_weight=0.0, backbone="LightGCN", **{key: asked})  # fmt: skip
    with pytest.raises(ValueError, match=f"{key}='{asked}' applies to the SASRec backbone"):
        LightGCNBackbone(config, hand_dataset())
    config[key] = neutral
    assert LightGCNBackbone(config, hand_dataset()).n_layers == 1


def test_adjacency_is_the_symmetric_normalisation_of_distinct_training_pairs():
    users, items = training_pairs(hand_dataset())
    expected = [(u, i) for u, seq in HAND_HISTORY.items() for i in sorted(seq)]
    assert list(zip(users.tolist(), items.tolist(), strict=True)) == expected  # each pair once
    adjacency = hand_lightgcn().adjacency
    assert adjacency.is_sparse and adjacency._nnz() == 2 * len(expected)  # no repeated edge was summed
    dense = adjacency.to_dense()
    reference = torch.zeros(9, 9)  # nodes: users 0..3, then items 0..4 at 4..8
    for u, i in expected:
        reference[u, 4 + i] = reference[4 + i, u] = 1 / math.sqrt(HAND_DEGREE[f"u{u}"] * HAND_DEGREE[f"i{i}"])
    assert torch.allclose(dense, reference) and torch.equal(dense, dense.T)
    assert dense[0].abs().sum() == 0 and dense[4].abs().sum() == 0  # padding user and item: no edges
    twice = normalized_adjacency(np.r_[users, users], np.r_[items, items], 4, 5)  # a pair listed twice: one edge
    assert torch.equal(twice.to_dense(), dense)


def test_propagation_equals_a_dense_reference_and_reaches_every_trained_embedding():
    backbone = hand_lightgcn(n_layers=3, reg_weight=0.1)
    table = nn.Parameter(torch.randn(5, 3))
    users, items = backbone.propagate(table)
    layer = torch.cat([backbone.user_embedding.weight, table])
    dense, layers = backbone.adjacency.to_dense(), [layer]
    for _ in range(3):
        layers.append(dense @ layers[-1])
    final = torch.stack(layers).mean(0)
    assert torch.allclose(users, final[:4], atol=1e-6) and torch.allclose(items, final[4:], atol=1e-6)

    batch = Interaction({"user_id": torch.tensor([1, 2]), "item_id": torch.tensor([2, 4]),
                         NEG_LIST: torch.tensor([4, 1])})  # fmt: skip
    all_items = backbone.batch_items(batch)
    assert torch.equal(all_items, torch.arange(5))
    triples = backbone.triples(batch, all_items, table, all_items)
    assert torch.allclose(triples.user, users[[1, 2]]) and torch.allclose(triples.neg, items[[4, 1]])
    assert torch.equal(triples.pos_items, torch.tensor([2, 4]))
    ego = [backbone.user_embedding.weight[[1, 2]], table[[2, 4]], table[[4, 1]]]
    assert torch.allclose(triples.extra_loss, 0.1 * sum((e**2).sum() for e in ego) / 2 / 2)  # EmbLoss, squared
    loss = nn.functional.softplus((triples.user * (triples.neg - triples.pos)).sum(-1)).mean() + triples.extra_loss
    loss.backward()
    assert (table.grad[1:].abs().sum(1) > 0).all()  # every item is a neighbour of the batch's users
    # User 3 is in no row, but shares items with users 1 and 2: propagation carries gradient to it.
    assert (backbone.user_embedding.weight.grad[1:].abs().sum(1) > 0).all()


# --- the generated dataset ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbones")
    data = build_atomic_dataset(root / "data", n_items=60, images=False)
    base = {"checkpoint_dir": str(root / "saved"), "cache_dir": str(root / "cache"), "show_progress": False,
            "device": "cpu", "use_gpu": False, "state": "WARNING", "reproducibility": True}  # fmt: skip
    config = config_for("GlobalPEFT", data, base, MAX_ITEM_LIST_LENGTH=MAX_LEN, hidden_size=HIDDEN, inner_size=16,
                        n_heads=2, train_batch_size=4, pair_batch_size=PAIR_BATCH)  # fmt: skip
    dataset = create_dataset(config)
    train, valid, _ = dataset.build()
    tokens = train.field2id_token
    item_id = {t: i for i, t in enumerate(tokens["item_id"])}
    # Leave-one-out: all but each user's last two items are training items.
    history = {u: [item_id[t] for t in data.sequences[tokens["user_id"][u]][:-2]] for u in range(1, train.user_num)}
    group_of_user = np.arange(train.user_num) % N_GROUPS
    group_of_user[0] = -1
    return SimpleNamespace(config=config, train=train, valid=valid, history=history, group_of_user=group_of_user)


def toy_pairs(toy) -> list[tuple[int, int]]:
    return sorted((u, i) for u, items in toy.history.items() for i in items)


def epoch_rows(loader) -> list[tuple[int, int, int, int]]:
    """(user, item, negative, group or -1) of every row of one epoch, in order."""
    rows = []
    for batch in loader:
        groups = batch[GROUP_ID].tolist() if GROUP_ID in batch.columns else [-1] * len(batch)
        assert batch[NEG_LIST].shape == batch["user_id"].shape and len(set(groups)) == 1
        columns = (batch["user_id"].tolist(), batch["item_id"].tolist(), batch[NEG_LIST].tolist(), groups)
        rows += zip(*columns, strict=True)
    return rows


def test_training_pairs_are_each_users_whole_training_history_once(toy):
    assert max(len(items) for items in toy.history.values()) > MAX_LEN + 1  # longer than any item list
    users, items = training_pairs(toy.train)
    assert list(zip(users.tolist(), items.tolist(), strict=True)) == toy_pairs(toy)


def test_pair_loader_covers_every_pair_once_with_negatives_outside_the_users_items(toy):
    loader = LightGCNBackbone.training_loader(toy.config, toy.train, SequenceNegativeSampler(toy.train.item_num, 0))
    assert isinstance(loader, UserItemPairDataLoader) and loader.step == PAIR_BATCH
    epochs = [epoch_rows(loader) for _ in range(2)]
    for rows in epochs:
        assert sorted((u, i) for u, i, _, _ in rows) == toy_pairs(toy)
        assert all(0 < neg < toy.train.item_num and neg not in toy.history[u] for u, _, neg, _ in rows)
    assert epochs[0] != epochs[1]  # shuffled anew each epoch


def test_grouped_pair_batches_hold_one_group_and_draw_from_its_pool(toy):
    groups = UserGroups(toy.group_of_user, N_GROUPS, "random", 0)
    pools = [set(p.tolist()) for p in training_item_pools(toy.train, groups)]
    assert all(len(pool) < toy.train.item_num - 1 for pool in pools)  # strict subsets: the check means something
    sampler = GroupNegativeSampler(toy.train.item_num, 0, training_item_pools(toy.train, groups))
    loader = LightGCNBackbone.training_loader(toy.config, toy.train, sampler, toy.group_of_user)
    assert isinstance(loader, GroupedUserItemPairDataLoader)
    rows = epoch_rows(loader)
    assert sorted((u, i) for u, i, _, _ in rows) == toy_pairs(toy)
    assert all(g == toy.group_of_user[u] and neg in pools[g] and neg not in toy.history[u] for u, _, neg, g in rows)
    missing = toy.group_of_user.copy()
    missing[[2, 5]] = -1
    with pytest.raises(ValueError, match="2 user"):
        GroupedUserItemPairDataLoader(toy.config, toy.train, sampler, missing)


@pytest.mark.parametrize("grouped", [False, True])
def test_pair_loader_state_dict_reproduces_the_next_epoch(toy, grouped):
    def make():
        groups = UserGroups(toy.group_of_user, N_GROUPS, "random", 0)
        sampler = GroupNegativeSampler(toy.train.item_num, 0, training_item_pools(toy.train, groups))
        return LightGCNBackbone.training_loader(toy.config, toy.train, sampler, toy.group_of_user if grouped else None)

    first = make()
    epoch1 = epoch_rows(first)
    state = first.state_dict()
    epoch2 = epoch_rows(first)
    resumed = make()
    resumed.load_state_dict(state)
    assert epoch_rows(resumed) == epoch2 != epoch1


# --- SASRec: GlobalPEFT's numbers ---------------------------------------------------------------------


def reference_encoder(config, seed):
    """SASRecEncoder initialised as GlobalPEFT._init_weights did for its sequence_encoder."""
    torch.manual_seed(seed)
    encoder = SASRecEncoder(config, MAX_LEN)
    for module in encoder.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=config["initializer_range"])
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()
    return encoder.eval()


def reference_states(encoder, table, seq):
    """GlobalPEFT.encode_sequences, with RecBole's causal mask written out: position j sees i <= j, non-padding."""
    causal = torch.tril(torch.ones(seq.shape[1], seq.shape[1], dtype=torch.bool))
    visible = causal[None, None] & (seq != 0)[:, None, None, :]
    return encoder(table[seq], torch.where(visible, 0.0, -10000.0))


def test_sasrec_is_globalpefts_encoder_with_its_init_and_numbers(toy):
    torch.manual_seed(3)
    backbone = SASRecBackbone(toy.config, toy.train)
    encoder = reference_encoder(toy.config, 3)
    assert all(torch.equal(a, b) for a, b in zip(backbone.encoder.state_dict().values(),
                                                  encoder.state_dict().values(), strict=True))  # fmt: skip
    encoder = reference_encoder(toy.config, 4)  # other weights, copied over: the numbers follow the weights
    backbone.encoder.load_state_dict(encoder.state_dict())
    backbone.eval()
    table = torch.randn(toy.train.item_num, HIDDEN)

    valid = toy.valid.inter_feat[torch.arange(6)]
    seq, length = valid["item_id_list"], valid["item_length"]
    expected = reference_states(encoder, table, seq)[torch.arange(6), length - 1]
    assert torch.allclose(backbone.user_vectors(valid, table), expected, atol=1e-5)
    assert torch.allclose(backbone.encode(table[seq], seq), reference_states(encoder, table, seq), atol=1e-5)

    loader = SASRecBackbone.training_loader(toy.config, toy.train, SequenceNegativeSampler(toy.train.item_num, 0))
    batch = next(iter(loader))
    items, inverse = torch.unique(backbone.batch_items(batch), return_inverse=True)
    triples = backbone.triples(batch, items, table[items], inverse)
    pos, neg, target = batch[TARGET_LIST], batch[NEG_LIST], batch[TARGET_LIST] > 0
    states = reference_states(encoder, table, batch["item_id_list"])
    assert torch.allclose(triples.user, states[target], atol=1e-5) and torch.equal(triples.pos_items, pos[target])
    assert torch.equal(triples.pos, table[pos][target]) and torch.equal(triples.neg, table[neg][target])
    assert triples.extra_loss == 0.0


def test_sasrec_interest_vectors_read_the_last_training_items_only(toy):
    backbone = SASRecBackbone(toy.config, toy.train).train()
    table = torch.randn(toy.train.item_num, HIDDEN)
    users, vectors = backbone.interest_vectors(toy.train, table, batch_size=7)
    assert backbone.training  # the mode is restored
    assert users.tolist() == sorted(toy.history)
    seqs = [toy.history[u][-MAX_LEN:] for u in users.tolist()]
    seq = torch.tensor([s + [0] * (MAX_LEN - len(s)) for s in seqs])
    states = reference_states(backbone.encoder.eval(), table, seq)
    expected = states[torch.arange(len(seqs)), torch.tensor([len(s) for s in seqs]) - 1]
    assert np.allclose(vectors, expected.detach().numpy(), atol=1e-5)


# --- LightGCN at evaluation ---------------------------------------------------------------------------


def test_lightgcn_scores_the_rows_users_and_propagates_once_per_table(toy, monkeypatch):
    backbone = LightGCNBackbone(toy.config, toy.train)
    assert backbone.n_layers == 2 and backbone.reg_weight == 1e-4  # properties/backbone/LightGCN.yaml
    assert backbone.adjacency._nnz() == 2 * len(toy_pairs(toy))
    calls = []
    propagate = backbone.propagate
    monkeypatch.setattr(backbone, "propagate", lambda table: calls.append(1) or propagate(table))
    table = torch.randn(toy.train.item_num, HIDDEN)
    users_all, items_all = propagate(table)
    backbone.eval()
    valid = toy.valid.inter_feat[torch.arange(6)]
    assert torch.allclose(backbone.user_vectors(valid, table), users_all[valid["user_id"]])
    assert torch.allclose(backbone.scoring_table(table), items_all)
    assert len(calls) == 1  # users and items of one table: one propagation
    backbone.user_vectors(valid, table.clone())
    backbone.user_vectors(valid, table)
    assert len(calls) == 2  # a second table has its own; the first is still cached
    ids, vectors = backbone.interest_vectors(toy.train, table, batch_size=4)
    assert ids.tolist() == sorted(toy.history) and np.allclose(vectors, users_all[ids].detach().numpy())
    backbone.train()
    backbone.user_vectors(valid, table)
    backbone.user_vectors(valid, table)
    assert len(calls) == 5  # interest_vectors after eval's cache was dropped by train(); no cache while training
