"""The personalisation baselines (paper §4.1.3): UserLevel1/2 and GroupLevel1/2 (a user or group
embedding as one more sequence element, before or after the items, or concatenated with every item and projected), and
LargeGlobalPEFT (one adapter and projector as large as PerPEFT's together).

Where the personal vector enters the encoder and which output predicts; that it reaches only its
own users' scores; the group models' two stages (from one stage-1 GlobalPEFT shared by the module)
and their command-line path from a stage-1 checkpoint; LargeGlobalPEFT's size against PerPEFT's;
the one-modality switches; end-to-end runs with result files."""

from __future__ import annotations

import json
import logging
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from recbole.utils import init_seed

from recbole_perpeft.config import Config
from recbole_perpeft.data.dataloader import GroupedUserSequenceDataLoader, UserSequenceDataLoader
from recbole_perpeft.data.sampler import SequenceNegativeSampler
from recbole_perpeft.encoders.clip import ClipFoundation
from recbole_perpeft.grouping import UserGroups
from recbole_perpeft.model.personalisation import TwoStageGrouped
from recbole_perpeft.quick_start import run
from recbole_perpeft.two_stage import TwoStageTrainer, stage_config
from recbole_perpeft.utils import get_model, trainable_parameters_by_component
from tests.tiny import build_stage1_env, item_token, run_stage2

DATASET = "baselinesds"
N_USERS, N_ITEMS, N_GROUPS = 40, 40, 2
NO_IMAGE_ITEM, NO_TITLE_ITEM = item_token(4), item_token(9)
USER_MODELS = ["UserLevel1", "UserLevel2"]
GROUP_MODELS = ["GroupLevel1", "GroupLevel2"]
PERSONAL_MODELS = USER_MODELS + GROUP_MODELS
METRICS = {"hit@5", "hit@10", "ndcg@5", "ndcg@10"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Data, loaders, the trained stage-1 GlobalPEFT (with its checkpoint) and the user groups, once."""
    return build_stage1_env(
        tmp_path_factory.mktemp("baselines"), "GroupLevel1", DATASET, N_USERS, N_ITEMS,
        missing_images=[NO_IMAGE_ITEM], empty_titles=[NO_TITLE_ITEM],
    )  # fmt: skip


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def model_config(env, name: str, **overrides):
    config = stage_config(env.config, name, 1)
    for key, value in overrides.items():
        config[key] = value
    return config


def build(env, name: str, load: bool = True, seed: int | None = None, **overrides):
    """A baseline on the module's training data; group models get the stage-1 state and the groups
    (``load``), or only the groups."""
    config = model_config(env, name, **overrides)
    init_seed(config["seed"] if seed is None else seed, True)
    model = get_model(name)(config, env.train_dataset)
    if name in GROUP_MODELS:
        if load:
            model.load_global(env.global_model.state_dict(), env.groups)
        else:
            model.set_groups(env.groups)
    return model


def train_batch(env, config):
    """The first training batch (train_batch_size users, one sequence each)."""
    loader = UserSequenceDataLoader(
        config, env.train_dataset, SequenceNegativeSampler(env.train_dataset.item_num, 0), shuffle=False
    )
    return next(iter(loader))


def eval_batch(env):
    return next(iter(env.test_data))[0]


class EncoderSpy:
    """Records what the model's sequence encoder is fed (item vectors and attention mask) and returns."""

    def __init__(self, model):
        self.calls = []
        self.forward = model.sequence_encoder.forward

        def spy(item_emb, attention_mask):
            output = self.forward(item_emb, attention_mask)
            self.calls.append((item_emb.detach().clone(), attention_mask.detach().clone(), output.detach().clone()))
            return output

        model.sequence_encoder.forward = spy


# --- 1. where the personal vector enters ------------------------------------------------------------------


@pytest.mark.parametrize("position", ["start", "end"])
@pytest.mark.parametrize("name", ["UserLevel1", "GroupLevel1"])
def test_level1_puts_the_personal_vector_in_the_sequence_and_predicts_from_the_right_output(env, name, position):
    model = build(env, name, personal_vector_position=position)
    model.eval()
    hidden, max_len = env.config["hidden_size"], model.max_seq_length
    assert model.sequence_encoder.position_embedding.num_embeddings == max_len + 1
    interaction = eval_batch(env)
    seq, lengths, users = interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN], interaction[model.USER_ID]
    assert (lengths == max_len).any() and (lengths < max_len).any()  # both a full and a shorter sequence
    spy = EncoderSpy(model)
    scores = model.full_sort_predict(interaction)
    assert scores.shape == (len(users), model.n_items)
    (fed, mask, output), = spy.calls  # fmt: skip
    assert fed.shape == (len(users), max_len + 1, hidden) and mask.shape[-1] == max_len + 1
    table = model.item_table()
    source = users if name == "UserLevel1" else model.group_of_user[users]
    personal = model.personal_embedding.weight[source]
    for row in range(len(users)):
        n = int(lengths[row])
        first, at = (1, 0) if position == "start" else (0, n)  # where the items start, where the vector is
        torch.testing.assert_close(fed[row, first : first + n], table[seq[row, :n]])
        torch.testing.assert_close(fed[row, at], personal[row], rtol=0, atol=0)
        # The predicting output (index n either way: the last item, or the vector after it) attends to every
        # item and to the vector, and to no padding.
        assert (mask[row, 0, n, : n + 1] == 0).all() and (mask[row, 0, n, n + 1 :] < 0).all()
        torch.testing.assert_close(scores[row], output[row, n] @ table.T)
        assert not torch.allclose(scores[row], output[row, n - 1] @ table.T)
    interaction[model.ITEM_ID] = torch.arange(len(users)) % (model.n_items - 1) + 1
    torch.testing.assert_close(
        model.predict(interaction), scores.gather(1, interaction[model.ITEM_ID].unsqueeze(1)).squeeze(1)
    )


def test_level1_refuses_an_unknown_position(env):
    with pytest.raises(ValueError, match="personal_vector_position must be start .* or end .*, got 'middle'"):
        build(env, "UserLevel1", personal_vector_position="middle")


@pytest.mark.parametrize("name", ["UserLevel2", "GroupLevel2"])
def test_level2_feeds_linear_of_item_and_personal_vector_at_every_position(env, name):
    model = build(env, name)
    model.eval()
    hidden, max_len = env.config["hidden_size"], model.max_seq_length
    assert model.personal_fusion.in_features == 2 * hidden and model.personal_fusion.out_features == hidden
    interaction = eval_batch(env)
    seq, lengths, users = interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN], interaction[model.USER_ID]
    spy = EncoderSpy(model)
    scores = model.full_sort_predict(interaction)
    (fed, _, output), = spy.calls  # fmt: skip
    assert fed.shape == (len(users), max_len, hidden) and scores.shape == (len(users), model.n_items)
    table = model.item_table()
    source = users if name == "UserLevel2" else model.group_of_user[users]
    personal = model.personal_embedding.weight[source]
    weight, bias = model.personal_fusion.weight, model.personal_fusion.bias
    for row in range(len(users)):
        n = int(lengths[row])
        pairs = torch.cat([table[seq[row, :n]], personal[row].expand(n, -1)], dim=-1)
        torch.testing.assert_close(fed[row, :n], pairs @ weight.T + bias)
        torch.testing.assert_close(scores[row], output[row, n - 1] @ table.T)


@pytest.mark.parametrize("position", ["start", "end"])
def test_level1_loss_is_eq1_at_every_item_position_and_the_end_layouts_user_position(env, position):
    model = build(env, "UserLevel1", personal_vector_position=position)
    model.eval()  # no dropout: the loss can be recomputed by hand
    batch = train_batch(env, model_config(env, "UserLevel1"))
    seq, lengths, users = batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN], batch[model.USER_ID]
    pos, neg = batch["target_item_list"], batch["neg_item_list"]
    loss = model.calculate_loss(batch)
    table = model.item_table()
    batch_size, max_len = seq.shape
    emb = torch.zeros(batch_size, max_len + 1, table.shape[1])
    marker = torch.zeros(batch_size, max_len + 1, dtype=torch.long)
    for row in range(batch_size):
        n = int(lengths[row])
        first, at = (1, 0) if position == "start" else (0, n)
        emb[row, first : first + n] = table[seq[row, :n]]
        emb[row, at] = model.personal_embedding.weight[users[row]]
        marker[row, : n + 1] = 1
    with torch.no_grad():
        output = model.sequence_encoder(emb, model.get_attention_mask(marker))
    terms = []
    for row in range(batch_size):
        n = int(lengths[row])
        if position == "start":  # (output position, target position): each item's output, the prompt's none
            steps = [(t + 1, t) for t in range(n)]
        else:  # each item's output and the user position's, whose target is the last one's
            steps = [(t, t) for t in range(n)] + [(n, n - 1)]
        for out_at, target_at in steps:
            p = output[row, out_at] @ table[pos[row, target_at]]
            q = output[row, out_at] @ table[neg[row, target_at]]
            terms.append(F.softplus(-p) + F.softplus(q))
    assert len(terms) == int((pos > 0).sum()) + (batch_size if position == "end" else 0)
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", PERSONAL_MODELS)
def test_a_training_step_reaches_only_the_batch_users_personal_vectors(env, name):
    model = build(env, name)
    model.train()
    batch = train_batch(env, model_config(env, name))
    loss = model.calculate_loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    users = batch[model.USER_ID]
    rows = users if name in USER_MODELS else model.group_of_user[users]
    touched = model.personal_embedding.weight.grad.abs().sum(1) > 0
    expected = torch.zeros_like(touched)
    expected[rows.unique()] = True
    assert torch.equal(touched, expected)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.item_tower.foundation.parameters())


# --- 2. a personal vector reaches only its own users -------------------------------------------------------


def nudge(model) -> torch.Tensor:
    """A random change of one personal vector (not a constant shift, which LayerNorm would cancel)."""
    return torch.randn(model.personal_embedding.embedding_dim, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", USER_MODELS)
def test_changing_one_users_embedding_changes_only_that_users_scores(env, name):
    model = build(env, name)
    model.eval()
    interaction = eval_batch(env)
    users = interaction[model.USER_ID]
    before = model.full_sort_predict(interaction)
    target = int(users[3])
    with torch.no_grad():
        model.personal_embedding.weight[target] += nudge(model)
    after = model.full_sort_predict(interaction)
    changed = (after - before).abs().amax(1) > 1e-4
    assert changed.tolist() == (users == target).tolist()
    others = users != target
    torch.testing.assert_close(after[others], before[others], rtol=0, atol=0)


@pytest.mark.parametrize("name", GROUP_MODELS)
@pytest.mark.parametrize("group", range(N_GROUPS))
def test_changing_a_group_embedding_changes_only_that_groups_users_scores(env, name, group):
    model = build(env, name)
    model.eval()
    interaction = eval_batch(env)
    in_group = torch.as_tensor(env.groups.labels)[interaction[model.USER_ID]] == group
    assert in_group.any() and (~in_group).any()
    before = model.full_sort_predict(interaction)
    with torch.no_grad():
        model.personal_embedding.weight[group] += nudge(model)
    after = model.full_sort_predict(interaction)
    assert ((after - before).abs().amax(1) > 1e-4).tolist() == in_group.tolist()
    torch.testing.assert_close(after[~in_group], before[~in_group], rtol=0, atol=0)


# --- 3. group models: stage 2 from GlobalPEFT -----------------------------------------------------------------


@pytest.mark.parametrize("name", GROUP_MODELS)
def test_group_models_start_from_the_global_model(env, name):
    model = build(env, name)
    assert isinstance(model, TwoStageGrouped) and type(model).trainer_class is TwoStageTrainer
    stage1 = env.global_model.state_dict()
    state = model.state_dict()
    position_key = "backbone.encoder.position_embedding.weight"
    for key, value in stage1.items():
        if key == position_key and name == "GroupLevel1":  # one more position (the group vector's, first)
            assert torch.equal(state[key][1:], value) and state[key].shape[0] == value.shape[0] + 1
        else:
            assert torch.equal(state[key], value), key
    assert torch.equal(model.group_of_user, torch.as_tensor(env.groups.labels))
    assert model.personal_embedding.weight.shape == (N_GROUPS, env.config["hidden_size"])
    new = set(state) - set(stage1)
    assert new == {"group_of_user", "personal_embedding.weight"} | (
        {"personal_fusion.weight", "personal_fusion.bias"} if name == "GroupLevel2" else set()
    )


def test_grouplevel1_at_the_end_keeps_the_item_positions_in_place(env):
    model = build(env, "GroupLevel1", personal_vector_position="end")
    key = "backbone.encoder.position_embedding.weight"
    stage1 = env.global_model.state_dict()[key]
    assert torch.equal(model.state_dict()[key][:-1], stage1)  # the new (group vector's) position is the last


@pytest.mark.parametrize("name", GROUP_MODELS)
def test_load_global_and_set_groups_refuse_a_mismatch(env, name):
    model = build(env, name, load=False)
    with pytest.raises(RuntimeError, match="GlobalPEFT"):
        model.load_global({**env.global_model.state_dict(), "not_a_weight": torch.zeros(1)}, env.groups)
    state = dict(env.global_model.state_dict())
    del state["item_id_embedding.weight"]
    with pytest.raises(RuntimeError, match="item_id_embedding"):
        model.load_global(state, env.groups)
    three = UserGroups(env.groups.labels % 3, 3, "random", 0)
    with pytest.raises(ValueError, match="3 groups"):
        model.set_groups(three)
    model.group_of_user[int(eval_batch(env)[model.USER_ID][0])] = -1
    model.eval()
    with pytest.raises(ValueError, match="without a group"):
        model.full_sort_predict(eval_batch(env))


@pytest.fixture(scope="module", params=GROUP_MODELS)
def stage2(request, env, tmp_path_factory):
    """TwoStageRun's stage 2 of a group model (1 epoch, best checkpoint, test) from the module's stage 1."""
    name = request.param
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("stage2"))
        config = stage_config(env.config, name, env.config["stage2_epochs"])
        init_seed(config["seed"], True)
        run_ = run_stage2(env, config)
        model, trainer, best_valid, samplers = run_.model, run_.trainer, run_.best_valid, run_.samplers
        test_result = trainer.evaluate(env.test_data, load_best_model=True)
    model.eval()
    return SimpleNamespace(name=name, model=model, trainer=trainer, test_result=test_result, samplers=samplers,
                           best_valid=best_valid)  # fmt: skip


def test_group_models_train_through_the_two_stage_run(env, stage2):
    model, name = stage2.model, stage2.name
    assert type(model).__name__ == name
    assert len(stage2.samplers) == 1 and type(stage2.samplers[0]) is SequenceNegativeSampler  # group_negatives False
    assert set(stage2.test_result) == METRICS and set(stage2.best_valid) == METRICS
    fresh = build(env, name)
    assert not torch.allclose(model.personal_embedding.weight, fresh.personal_embedding.weight)  # trained
    on_disk = torch.load(stage2.trainer.saved_model_file, weights_only=True)
    assert on_disk["config"]["model"] == name
    assert torch.equal(on_disk["state_dict"]["group_of_user"], torch.as_tensor(env.groups.labels))
    assert not any(k.startswith("item_tower.foundation.") and "lora_" not in k for k in on_disk["state_dict"])

    # The checkpoint alone rebuilds the model: same scores.
    fresh = build(env, name, load=False, seed=5)
    fresh.group_of_user.fill_(-1)
    fresh.load_state_dict(on_disk["state_dict"])
    fresh.eval()
    interaction = eval_batch(env)
    torch.testing.assert_close(fresh.full_sort_predict(interaction), model.full_sort_predict(interaction))


@pytest.mark.parametrize("name", GROUP_MODELS)
def test_group_models_run_from_a_global_checkpoint_with_quick_start(env, name, tmp_path):
    result_file = tmp_path / "result.json"
    keys = {**env.config_dict, "checkpoint_dir": str(tmp_path / "saved"),
            "global_checkpoint": env.stage1_trainer.global_checkpoint}  # fmt: skip
    result = run(name, DATASET, config_dict=keys, result_file=str(result_file))
    written = json.loads(result_file.read_text())
    assert written["model"] == name and written["global_checkpoint"] == env.stage1_trainer.global_checkpoint
    assert "stage1_train" not in written["seconds"] and written["seconds"]["stage2_train"] > 0
    assert set(written["test_result"]) == METRICS
    assert all(0.0 <= v <= 1.0 for v in written["test_result"].values())
    assert written["groups"]["n_groups"] == N_GROUPS and written["groups"]["sizes"] == env.groups.sizes()
    counts = written["trainable_parameters"]
    hidden = env.config["hidden_size"]
    assert counts["group_specific/group_embeddings"] == N_GROUPS * hidden
    assert counts["per_group"] == {"group_embedding": hidden}
    assert counts["global/item_id_embedding"] > 0 and counts["global/peft_adapter"] > 0
    assert written["config"]["group_negatives"] is False
    assert result["test_result"] == written["test_result"]
    assert torch.load(written["checkpoint"], weights_only=True)["config"]["model"] == name


# --- 4. parameter accounting -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PERSONAL_MODELS)
def test_trainable_parameters_show_the_personal_embeddings_separately(env, name):
    model = build(env, name)
    counts = trainable_parameters_by_component(model)
    hidden, level = env.config["hidden_size"], "user" if name in USER_MODELS else "group"
    rows = env.train_dataset.user_num if level == "user" else N_GROUPS
    assert counts[f"{level}_specific/{level}_embeddings"] == rows * hidden
    if name.endswith("2"):
        assert counts["global/personal_fusion"] == 2 * hidden * hidden + hidden
    assert counts["total"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["total"] == sum(v for k, v in counts.items() if k not in ("total", "foundation_model_frozen"))


@pytest.mark.parametrize("n_groups", [2, 8])
def test_large_global_peft_is_about_as_large_as_perpeft(env, n_groups, caplog):
    with caplog.at_level(logging.INFO):
        large = build(env, "LargeGlobalPEFT", n_groups=n_groups)
    perpeft = build(env, "PerPEFT", load=False, n_groups=n_groups)
    base = build(env, "GlobalPEFT")
    large_total = trainable_parameters_by_component(large)["total"]
    perpeft_total = trainable_parameters_by_component(perpeft)["total"]
    assert abs(large_total - perpeft_total) <= 0.1 * perpeft_total, (large_total, perpeft_total)
    # Also what each adds to GlobalPEFT (the tiny data's shared parts would hide a mismatch there).
    base_total = trainable_parameters_by_component(base)["total"]
    assert large_total > base_total
    assert abs((large_total - base_total) - (perpeft_total - base_total)) <= 0.1 * (perpeft_total - base_total)
    # The rank and the projector width are n_groups times the base model's; alpha / r is kept.
    rank = {p.shape[0] for n, p in large.named_parameters() if "lora_A" in n}
    assert rank == {4 * n_groups}
    first = large.item_tower.projector["mlp"][0]
    assert first.out_features == 32 * n_groups
    assert large.scaled == {"r": (4, 4 * n_groups), "lora_alpha": (8, 8 * n_groups),
                            "projector_hidden_size": (32, 32 * n_groups)}  # fmt: skip
    lora_layer = next(m for m in large.modules() if hasattr(m, "scaling") and isinstance(m.scaling, dict))
    assert lora_layer.scaling["default"] == pytest.approx(8 / 4)
    # The PerPEFT-equivalent estimate is PerPEFT's exact count, and both are logged side by side.
    assert large.parameter_comparison == {"own": large_total, "perpeft_equivalent": perpeft_total}
    assert f"trainable parameters {large_total} vs. PerPEFT with {n_groups} groups (estimate) {perpeft_total}" in (
        caplog.text
    )
    assert env.config["peft_config"] is None and env.config["projector_hidden_size"] == 32  # config untouched


def test_large_global_peft_scales_a_side_network_and_counts_perpeft_exactly(env):
    large = build(env, "LargeGlobalPEFT", peft_type="IISAN", n_groups=2)
    perpeft = build(env, "PerPEFT", load=False, peft_type="IISAN", n_groups=2)
    assert large.scaled["side_adapter_size"] == (32, 64)
    assert {m.down.out_features for m in large.item_tower.side.intra["text"]} == {64}
    perpeft_total = trainable_parameters_by_component(perpeft)["total"]
    assert large.parameter_comparison["perpeft_equivalent"] == perpeft_total


# --- 5. one modality ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["UserLevel1", "UserLevel2", "GroupLevel1", "LargeGlobalPEFT"])
@pytest.mark.parametrize("modality", ["text", "image"])
def test_one_modality_never_calls_the_other_encoder(env, name, modality, monkeypatch):
    other = "image" if modality == "text" else "text"
    calls = []
    used = getattr(ClipFoundation, f"encode_{modality}")

    def counting(self, *args, **kwargs):
        calls.append(modality)
        return used(self, *args, **kwargs)

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"encode_{other} called in a {modality}-only run")

    monkeypatch.setattr(ClipFoundation, f"encode_{other}", refuse)
    monkeypatch.setattr(ClipFoundation, f"encode_{modality}", counting)
    model = build(env, name, load=False, modalities=[modality])
    assert model.item_tower.modalities == [modality]
    model.train()
    loss = model.calculate_loss(train_batch(env, model_config(env, name, modalities=[modality])))
    loss.backward()
    model.eval()
    scores = model.full_sort_predict(eval_batch(env))
    assert torch.isfinite(scores).all() and calls


# --- 6. end to end --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["UserLevel1", "LargeGlobalPEFT"])
def test_quick_start_run_writes_a_result_with_test_metrics(env, name, tmp_path):
    result_file = tmp_path / "out" / "result.json"
    keys = {**env.config_dict, "checkpoint_dir": str(tmp_path / "saved")}
    run(name, DATASET, config_dict=keys, result_file=str(result_file))
    result = json.loads(result_file.read_text())
    assert result["model"] == name
    for key in ("best_valid_result", "test_result"):
        assert set(result[key]) == METRICS and all(0.0 <= v <= 1.0 for v in result[key].values())
    counts = result["trainable_parameters"]
    assert counts["total"] > 0 and counts["foundation_model_frozen"] > 0
    if name == "UserLevel1":
        assert counts["user_specific/user_embeddings"] == env.train_dataset.user_num * env.config["hidden_size"]
    checkpoint = torch.load(result["checkpoint"], weights_only=True)
    assert checkpoint["config"]["model"] == name and os.path.isfile(result["checkpoint"])


def test_yaml_lineage_gives_group_models_the_shared_two_stage_keys(env):
    keys = {**env.config_dict}
    for key in ("n_groups", "stage1_epochs", "stage2_epochs"):
        keys.pop(key)
    configs = {name: Config(model=name, dataset=DATASET, config_dict=keys) for name in ["PerPEFT", *GROUP_MODELS]}
    for config in configs.values():
        assert (config["n_groups"], config["stage1_epochs"], config["stage2_epochs"]) == (8, 10, 20)
        assert config["grouping_method"] == "kmeans" and "global_checkpoint" in config.final_config_dict
    assert configs["PerPEFT"]["group_negatives"] is True
    assert configs["GroupLevel1"]["group_negatives"] is False and configs["GroupLevel2"]["group_negatives"] is False
    large = Config(model="LargeGlobalPEFT", dataset=DATASET, config_dict=keys)
    assert large["n_groups"] == 8 and large["stage1_epochs"] is None


# --- SharedGroupPEFT: PerPEFT's stage-2 batches and negatives, one shared adapter (a control) ----------------


def test_shared_group_peft_continues_the_global_model_on_group_batches_with_group_negatives(env, tmp_path):
    from recbole_perpeft.data.sampler import GroupNegativeSampler
    from recbole_perpeft.model.sequential_recommender.perpeft import PerPEFT

    config = stage_config(Config(model="SharedGroupPEFT", dataset=DATASET, config_dict=env.config_dict),
                          "SharedGroupPEFT", 1)  # fmt: skip
    assert config["group_negatives"] is True  # its YAML
    init_seed(config["seed"], True)
    run_ = run_stage2(env, config)
    model, best_valid, loaders = run_.model, run_.best_valid, run_.loaders
    assert type(model).__name__ == "SharedGroupPEFT" and not isinstance(model, PerPEFT)
    assert set(best_valid) == METRICS
    loader = loaders[0]
    assert isinstance(loader, GroupedUserSequenceDataLoader)
    assert isinstance(loader._sampler, GroupNegativeSampler)  # PerPEFT's negatives
    for batch in loader:
        assert batch["group_id"].unique().numel() == 1  # PerPEFT's group-homogeneous batches
    # One adapter: the same names and shapes as GlobalPEFT's, and it moved in training.
    global_state, state = env.global_model.state_dict(), model.state_dict()
    assert state.keys() == global_state.keys()
    adapters = [k for k in state if "lora_" in k]
    assert adapters and any(not torch.equal(state[k], global_state[k]) for k in adapters)
    assert not any(".group" in k for k in adapters)


@pytest.mark.parametrize("name", PERSONAL_MODELS)
def test_loss_positions_last_reaches_the_personalisation_baselines(env, name):
    """``loss_positions: last`` is SASRec's backbone mask; the baselines lay targets out their own way and
    must read the same mask (else a Table 2 run with it trains them on every position, unequally)."""
    batch = train_batch(env, model_config(env, name))
    pos = batch["target_item_list"]
    counts = {}
    for positions in ("all", "last"):
        model = build(env, name, loss_positions=positions)
        seen = []
        original = model.recommendation_loss
        def spy(triples, *args, seen=seen, original=original):
            seen.append(triples)
            return original(triples, *args)

        model.recommendation_loss = spy
        assert torch.isfinite(model.calculate_loss(batch))
        counts[positions] = len(seen[0].pos_items)
        if positions == "last":  # one target per sequence: its last next item
            last = pos.gather(1, ((pos > 0).sum(1) - 1).unsqueeze(1)).squeeze(1)
            assert torch.equal(seen[0].pos_items, last)
    assert counts["last"] == len(pos) < counts["all"]
