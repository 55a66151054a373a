"""``loss_type: SAMPLED_SOFTMAX``: the loss against a hand computation (logQ correction, accidental hits), the
samplers' shared draw (uniform, seeded, a group's pool), the loaders' shared negatives, and the models: each
negative encoded once (GlobalPEFT through the foundation path, WithoutMM), LightGCN's propagated negatives,
PerPEFT's group pool, and the personal-vector baselines."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from recbole.utils import init_seed

from recbole_perpeft.data.dataloader import GROUP_ID, NEG_LIST, SHARED_NEG_LOG_Q, SHARED_NEGATIVES, TARGET_LIST
from recbole_perpeft.data.sampler import GroupNegativeSampler, SequenceNegativeSampler
from recbole_perpeft.grouping import UserGroups, training_item_pools
from recbole_perpeft.model.losses import sampled_softmax_ce
from recbole_perpeft.two_stage import TwoStageTrainer
from tests.tiny import build_model, make_atomic_dataset, make_tiny_clip, quick_config

DATASET, K = "sampledsm", 6

# --- the loss -------------------------------------------------------------------------------------------------


def test_loss_equals_a_hand_computation_with_log_q_and_a_masked_accidental_hit():
    user = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    pos = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    pos_items = torch.tensor([3, 6])
    neg = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    neg_items = torch.tensor([5, 6, 7])  # item 6 is row 2's positive: an accidental hit there
    log_q = torch.full((3,), math.log(3 / 10))  # 3 of a pool of 10
    c = math.log(10 / 3)  # what - log Q adds to each negative's logit
    row1 = -math.log(math.exp(2) / (math.exp(2) + math.exp(1 + c) + math.exp(0 + c) + math.exp(1 + c)))
    row2 = -math.log(math.exp(2) / (math.exp(2) + math.exp(0 + c) + math.exp(2 + c)))  # item 6 left out
    loss = sampled_softmax_ce(user, pos, pos_items, neg, neg_items, log_q)
    assert loss.item() == pytest.approx((row1 + row2) / 2, rel=1e-6)
    # Without the correction (the whole pool drawn: Q = 1) the negatives count once each.
    plain = -math.log(math.exp(2) / (math.exp(2) + math.exp(1) + math.exp(0) + math.exp(1)))
    assert sampled_softmax_ce(user[:1], pos[:1], pos_items[:1], neg, neg_items, torch.zeros(3)).item() == \
        pytest.approx(plain, rel=1e-6)  # fmt: skip


def test_an_accidental_hit_is_as_if_that_negative_were_not_drawn():
    torch.manual_seed(0)
    user, pos, neg = torch.randn(4, 5), torch.randn(4, 5), torch.randn(6, 5)
    neg_items, log_q = torch.tensor([11, 12, 13, 14, 15, 16]), torch.full((6,), -1.5)
    pos_items = torch.tensor([13, 20, 21, 16])  # rows 0 and 3 have their positive among the negatives
    loss = sampled_softmax_ce(user, pos, pos_items, neg, neg_items, log_q)
    rows = []
    for row in range(4):
        keep = neg_items != pos_items[row]
        rows.append(sampled_softmax_ce(user[row : row + 1], pos[row : row + 1], pos_items[row : row + 1],
                                       neg[keep], neg_items[keep], log_q[keep]))  # fmt: skip
    assert torch.allclose(loss, torch.stack(rows).mean())


def test_loss_gradients_flow_and_no_position_is_a_finite_zero():
    user, neg = torch.randn(3, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    pos = torch.randn(3, 4, requires_grad=True)
    loss = sampled_softmax_ce(user, pos, torch.tensor([1, 2, 3]), neg, torch.arange(4, 9), torch.zeros(5))
    loss.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (user, pos, neg))
    empty = sampled_softmax_ce(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), neg,
                               torch.arange(4, 9), torch.zeros(5))  # fmt: skip
    assert empty.item() == 0.0
    with pytest.raises(ValueError, match="neg_items and neg_log_q"):
        sampled_softmax_ce(user, pos, torch.tensor([1, 2, 3]), neg, torch.arange(4, 9), torch.zeros(4))


# --- the samplers' shared draw ------------------------------------------------------------------------------


def test_shared_draw_is_distinct_uniform_seeded_with_log_q_of_the_pool():
    sampler = SequenceNegativeSampler(21, seed=3)  # items 1..20
    items, log_q = sampler.sample_shared(5)
    assert len(set(items.tolist())) == 5 and set(items.tolist()) <= set(range(1, 21))
    assert torch.allclose(log_q, torch.full((5,), math.log(5 / 20)))
    assert torch.equal(items, SequenceNegativeSampler(21, seed=3).sample_shared(5)[0])  # seeded
    state = sampler.state_dict()
    following = sampler.sample_shared(5)[0]
    again = SequenceNegativeSampler(21, seed=99)
    again.load_state_dict(state)
    assert torch.equal(again.sample_shared(5)[0], following)  # resumable: the saved generator draws them
    counts = np.bincount(np.concatenate([sampler.sample_shared(5)[0].numpy() for _ in range(2000)]), minlength=21)
    assert counts[0] == 0 and np.abs(counts[1:] / 500 - 1).max() < 0.15  # each item ~ 2000 x 5 / 20 times
    whole, log_q = sampler.sample_shared(50)  # more than the pool: the pool itself, Q = 1
    assert sorted(whole.tolist()) == list(range(1, 21)) and not log_q.any()
    with pytest.raises(ValueError, match="sampled_softmax_negatives"):
        sampler.sample_shared(0)


def test_group_shared_draw_comes_from_the_groups_pool(caplog):
    pools = [np.array([2, 4, 6, 8, 10, 12]), np.array([3, 5]), np.array([], dtype=np.int64)]
    sampler = GroupNegativeSampler(15, seed=0, pools=pools)
    for _ in range(20):
        items, log_q = sampler.sample_shared(4, group=0)
        assert set(items.tolist()) <= set(pools[0].tolist()) and len(set(items.tolist())) == 4
        assert torch.allclose(log_q, torch.full((4,), math.log(4 / 6)))
    items, log_q = sampler.sample_shared(4, group=1)
    assert sorted(items.tolist()) == [3, 5] and not log_q.any()
    items, log_q = sampler.sample_shared(4, group=2)  # an empty pool: every item, with a warning
    assert set(items.tolist()) <= set(range(1, 15)) and "Group 2" in caplog.text
    assert torch.allclose(log_q, torch.full((4,), math.log(4 / 14)))
    assert set(sampler.sample_shared(14, group=None)[0].tolist()) == set(range(1, 15))
    with pytest.raises(ValueError, match="Group 3 has no item pool"):
        sampler.sample_shared(4, group=3)


# --- the models ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampled-softmax")
    clip = make_tiny_clip(root / "clip")
    data_keys = make_atomic_dataset(root / "data", DATASET, n_users=30, n_items=40)
    return quick_config(root, **data_keys, foundation_model="clip", clip_path=clip.path, peft_type="iisan",
                        topk=[5], valid_metric="hit@5", loss_type="SAMPLED_SOFTMAX", sampled_softmax_negatives=K,
                        hidden_dropout_prob=0.0, attn_dropout_prob=0.0, projector_dropout=0.0)  # fmt: skip


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # RecBole's trainer writes log_tensorboard/ under the working directory


def build(model: str, keys: dict, **overrides):
    config, instance, train_data, _, _ = build_model(model, DATASET, {**keys, **overrides})
    return SimpleNamespace(config=config, model=instance, train=train_data, dataset=train_data._dataset)


def record_encodes(monkeypatch, model) -> list[torch.Tensor]:
    """The item ids of every call of the model's one encoding pass (item_vectors_and_alignment)."""
    calls, encode = [], model.item_vectors_and_alignment
    monkeypatch.setattr(model, "item_vectors_and_alignment", lambda items: calls.append(items) or encode(items))
    return calls


@pytest.mark.parametrize("model_name", ["GlobalPEFT", "WithoutMM"])
def test_sasrec_loss_is_the_hand_formula_and_each_negative_is_encoded_once(keys, monkeypatch, model_name):
    run = build(model_name, keys)
    batch = next(iter(run.train))
    shared, log_q = batch[SHARED_NEGATIVES], batch[SHARED_NEG_LOG_Q]
    assert NEG_LIST not in batch and shared.shape == log_q.shape == (1, K) and len(batch) == 8
    assert torch.allclose(log_q, torch.full((1, K), math.log(K / (run.dataset.item_num - 1))))
    encodes = record_encodes(monkeypatch, run.model)
    tower_calls = []
    if run.model.item_tower is not None:  # the foundation path: one encode of the distinct items
        encode = run.model.item_tower.encode
        monkeypatch.setattr(run.model.item_tower, "encode", lambda items: tower_calls.append(items) or encode(items))
    run.model.eval()  # no dropout: the formula below is deterministic
    loss = run.model.calculate_loss(batch)
    seq, pos = batch["item_id_list"], batch[TARGET_LIST]
    distinct = torch.unique(torch.cat([seq.flatten(), pos.flatten(), shared[0]]))  # each negative once
    assert len(encodes) == 1 and torch.equal(encodes[0], distinct)
    assert len(tower_calls) == (run.model.item_tower is not None)
    assert all(torch.equal(items, distinct) for items in tower_calls)
    with torch.no_grad():
        table = run.model.item_vectors(torch.arange(run.dataset.item_num))
        states = run.model.backbone.encode(table[seq], seq)
        target = pos > 0
        expected = sampled_softmax_ce(states[target], table[pos][target], pos[target], table[shared[0]], shared[0],
                                      log_q[0])  # fmt: skip
    assert torch.allclose(loss, expected, atol=1e-5)


def test_lightgcn_scores_the_shared_negatives_propagated(keys):
    run = build("WithoutMM", keys, backbone="LightGCN", pair_batch_size=32, reg_weight=0.0)
    batch = next(iter(run.train))
    assert NEG_LIST not in batch and len(batch) == 32 and batch[SHARED_NEGATIVES].shape == (1, K)
    model = run.model.eval()
    loss = model.calculate_loss(batch)
    with torch.no_grad():
        users, items = model.backbone.propagate(model.item_id_embedding.weight)
        user, pos, shared = batch["user_id"], batch["item_id"], batch[SHARED_NEGATIVES][0]
        expected = sampled_softmax_ce(users[user], items[pos], pos, items[shared], shared, batch[SHARED_NEG_LOG_Q][0])
        raw = sampled_softmax_ce(users[user], items[pos], pos, model.item_id_embedding(shared), shared,
                                 batch[SHARED_NEG_LOG_Q][0])  # fmt: skip
    assert torch.allclose(loss, expected, atol=1e-6) and not torch.allclose(loss, raw, atol=1e-6)


def test_perpeft_draws_from_the_groups_pool_and_trains_the_groups_network(keys):
    run = build("PerPEFT", keys, n_groups=2)
    labels = (np.arange(run.dataset.user_num) > 5).astype(np.int64)  # a small group 0: a strict pool
    labels[0] = -1
    groups = UserGroups(labels, 2, "random", 0)
    run.model.set_groups(groups)
    trainer = TwoStageTrainer(run.config, run.model)
    trainer.groups = groups
    loader = trainer.stage2_loader(run.dataset)  # what stage 2 trains on (group_negatives: True)
    pools = training_item_pools(run.dataset, groups)
    assert len(pools[0]) < run.dataset.item_num - 1  # a strict subset: the check means something
    init_seed(0, True)
    for batch in loader:
        group = int(batch[GROUP_ID][0])
        shared = batch[SHARED_NEGATIVES][0]
        assert set(shared.tolist()) <= set(pools[group].tolist())
        assert torch.allclose(batch[SHARED_NEG_LOG_Q][0], torch.full((K,), math.log(K / len(pools[group]))))
    run.model.zero_grad()
    run.model.calculate_loss(batch).backward()
    grads = {g: [p.grad for p in run.model.item_tower.group_adapter_parameters(g)] for g in range(2)}
    assert any(g is not None and g.abs().sum() > 0 for g in grads[group])
    assert all(g is None or not g.any() for g in grads[1 - group])


@pytest.mark.parametrize("model_name", ["UserLevel1", "GroupLevel2"])
def test_personal_vector_baselines_train_on_the_shared_negatives(keys, monkeypatch, model_name):
    run = build(model_name, keys, n_groups=2)
    if model_name.startswith("Group"):
        labels = (np.arange(run.dataset.user_num) % 2).astype(np.int64)
        labels[0] = -1
        run.model.set_groups(UserGroups(labels, 2, "random", 0))
    batch = next(iter(run.train))
    assert NEG_LIST not in batch
    encodes = record_encodes(monkeypatch, run.model)
    model = run.model.eval()  # no dropout: the formula below is deterministic
    loss = model.calculate_loss(batch)
    seq, pos, lengths, shared = batch["item_id_list"], batch[TARGET_LIST], batch["item_length"], batch[SHARED_NEGATIVES]
    distinct = torch.unique(torch.cat([seq.flatten(), pos.flatten(), shared[0]]))  # each negative once
    assert len(encodes) == 1 and torch.equal(encodes[0], distinct)
    with torch.no_grad():
        table = model.item_vectors(torch.arange(run.dataset.item_num))
        output = model.encode_personalised(table[seq], seq, lengths, model.personal_vectors(batch["user_id"]))
        targets = model.align(pos, lengths)
        mask = targets > 0
        expected = sampled_softmax_ce(output[mask], table[targets[mask]], targets[mask], table[shared[0]], shared[0],
                                      batch[SHARED_NEG_LOG_Q][0])  # fmt: skip
    assert torch.allclose(loss, expected, atol=1e-5)
    model.train()
    model.zero_grad()
    model.calculate_loss(batch).backward()
    assert model.personal_embedding.weight.grad.abs().sum() > 0  # the personal vectors learn from it


def test_bad_settings_name_the_key(keys):
    with pytest.raises(ValueError, match="sampled_softmax_negatives must be a positive integer"):
        build("WithoutMM", keys, sampled_softmax_negatives=0)
    with pytest.raises(ValueError, match="loss_type must be one of BCE, BPR, INBATCH, SAMPLED_SOFTMAX"):
        build("WithoutMM", keys, loss_type="SOFTMAX")
