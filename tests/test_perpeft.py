"""PerPEFT (paper §3.3): stage 2 starts from stage 1, a step trains only the active group's adapter and
projector, groups diverge, checkpoints, the unseen-user path, per-group full ranking, parameter
accounting, the two-stage command line (fresh, from a stage-1 checkpoint, resumed) and its errors,
and the ablation switches (group negatives, grouping method)."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from recbole.data.interaction import Interaction
from recbole.utils import init_seed

from recbole_perpeft.config import Config
from recbole_perpeft.data import create_dataset
from recbole_perpeft.data.dataloader import GROUP_ID, GroupedUserSequenceDataLoader
from recbole_perpeft.data.sampler import GroupNegativeSampler, SequenceNegativeSampler
from recbole_perpeft.grouping import UserGroups
from recbole_perpeft.model.backbones.sasrec import training_histories
from recbole_perpeft.model.sequential_recommender.perpeft import PerPEFT
from recbole_perpeft.trainer import PEFTTrainer
from recbole_perpeft.two_stage import TwoStageTrainer, group_users, stage_config
from recbole_perpeft.utils import trainable_parameters_by_component
from tests.tiny import (
    build_stage1_env,
    item_token,
    load_entry_point,
    make_atomic_dataset,
    run_script,
    run_stage2,
    two_stage_keys,
)

DATASET = "perpeftds"
E2E_DATASET = "perpeftcli"
N_USERS, N_ITEMS, N_GROUPS = 40, 40, 2
# One item without an image and one without a title: the missing-modality placeholders take part.
NO_IMAGE_ITEM, NO_TITLE_ITEM = item_token(4), item_token(9)
GLOBAL = "default"  # ItemTower.GLOBAL_ADAPTER


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Data, loaders, the trained stage-1 GlobalPEFT and its user groups, built once."""
    return build_stage1_env(
        tmp_path_factory.mktemp("perpeft"), "PerPEFT", DATASET, N_USERS, N_ITEMS,
        missing_images=[NO_IMAGE_ITEM], empty_titles=[NO_TITLE_ITEM],
    )  # fmt: skip


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def perpeft_config(env, **overrides):
    config = stage_config(env.config, "PerPEFT", env.config["stage2_epochs"])
    config["n_groups"] = env.groups.n_groups
    for key, value in overrides.items():
        config[key] = value
    return config


def build_perpeft(env, load: bool = True, seed: int | None = None, **overrides) -> PerPEFT:
    """PerPEFT on the training data, initialised from the stage-1 model (``load``) or left fresh."""
    config = perpeft_config(env, **overrides)
    init_seed(config["seed"] if seed is None else seed, True)
    model = PerPEFT(config, env.train_dataset)
    if load:
        model.load_global(env.global_model.state_dict(), env.groups)
    return model


@pytest.fixture(scope="module")
def stage2(env, tmp_path_factory):
    """The runner's stage 2 (1 epoch, best checkpoint, test) from the module's stage 1, once; records
    the negative sampler the grouped training loader got."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("stage2"))
        init_seed(env.config["seed"], True)
        run = run_stage2(env, env.config)
        test_result = run.trainer.evaluate(env.test_data, load_best_model=True)
    run.model.eval()
    return SimpleNamespace(model=run.model, trainer=run.trainer, test_result=test_result, samplers=run.samplers,
                           loaders=run.loaders)  # fmt: skip


# --- names of the parts ------------------------------------------------------------------------------------


def part_of(name: str, n_groups: int) -> str:
    """Which component a PerPEFT parameter name belongs to."""
    if name.startswith("item_tower.foundation."):
        if f".{GLOBAL}." in name:
            return "global_adapter"
        for g in range(n_groups):
            if f".group_{g}." in name:
                return f"adapter_{g}"
        return "foundation_frozen"
    for g in range(n_groups):
        if name.startswith(f"item_tower.group_projectors.{g}."):
            return f"projector_{g}"
    if name.startswith("item_tower.projector."):
        return "global_projector"
    if name.startswith(("global_item_id_embedding.", "global_backbone.", "item_tower.global_placeholders.")):
        return "global_copies"
    if name.startswith(("item_id_embedding.", "backbone.", "item_tower.placeholders.")):
        return "shared"
    raise AssertionError(f"unclassified parameter {name}")


def group_adapter_params(model: PerPEFT, group: int) -> dict:
    """Group ``group``'s adapter, keyed by the matching global adapter key."""
    name = model.item_tower.group_adapter(group)
    params = model.item_tower.adapter_parameters(name)
    return {key.replace(f".{name}", f".{GLOBAL}"): p for key, p in params.items()}


def padded(history, max_len: int):
    """A history (oldest first) as one left-aligned padded row of the model's length, and its length."""
    history = list(history)[-max_len:]
    seq = torch.zeros(1, max_len, dtype=torch.long)
    seq[0, : len(history)] = torch.tensor(history)
    return seq, torch.tensor([len(history)])


@torch.no_grad()
def manual_table(model: PerPEFT, group: int) -> torch.Tensor:
    """Group ``group``'s item table computed from the parts: ID embedding + its adapter and projector."""
    assert not model.training
    model.item_tower.activate(group)
    items = torch.arange(model.n_items)
    return model.item_id_embedding(items) + model.item_tower(items)


@torch.no_grad()
def manual_user_vector(model: PerPEFT, seq, length, table) -> torch.Tensor:
    output = model.backbone.encoder(table[seq], model.get_attention_mask(seq))
    return output[torch.arange(len(seq)), length - 1]


# --- 1. stage 2 starts from stage 1 -------------------------------------------------------------------------


def test_stage2_components_start_equal_to_stage1(env):
    model = build_perpeft(env)
    tower = model.item_tower
    stage1 = env.global_model.state_dict()
    global_adapter = tower.adapter_parameters(GLOBAL)
    assert any(".text_model." in k for k in global_adapter)  # both CLIP towers adapted
    assert any(".vision_model." in k for k in global_adapter)

    state = model.state_dict()
    for key, value in stage1.items():  # everything stage 1 trained: shared parts, global adapter/projector
        assert torch.equal(state[key], value), key
    for group in range(N_GROUPS):
        adapter = group_adapter_params(model, group)
        assert adapter.keys() == global_adapter.keys()
        for key, param in adapter.items():
            assert torch.equal(param, stage1[f"item_tower.foundation.{key}"]), key
        projector = tower.group_projectors[group].state_dict()
        assert projector.keys() == tower.projector.state_dict().keys()
        for key, value in projector.items():
            assert torch.equal(value, stage1[f"item_tower.projector.{key}"]), key
    for key, value in model.global_item_id_embedding.state_dict().items():
        assert torch.equal(value, stage1[f"item_id_embedding.{key}"])
    for key, value in model.global_backbone.state_dict().items():
        assert torch.equal(value, stage1[f"backbone.{key}"])
    for key, value in tower.global_placeholders.state_dict().items():
        assert torch.equal(value, stage1[f"item_tower.placeholders.{key}"])
    assert np.array_equal(model.group_of_user.numpy(), env.groups.labels)

    model.eval()
    reference = env.global_model.item_table()
    for group in [*range(N_GROUPS), None]:
        torch.testing.assert_close(model.group_table(group), reference)


def test_load_global_and_set_groups_refuse_a_mismatch(env):
    model = build_perpeft(env, load=False)
    with pytest.raises(RuntimeError, match="GlobalPEFT"):
        model.load_global({**env.global_model.state_dict(), "not_a_weight": torch.zeros(1)}, env.groups)
    three = UserGroups(np.where(env.groups.labels >= 0, env.groups.labels % 3, -1), 3, "random", 0)
    with pytest.raises(ValueError, match="3 groups"):
        model.set_groups(three)


# --- 2. one stage-2 step --------------------------------------------------------------------------------------


@pytest.mark.parametrize("group", range(N_GROUPS))
def test_one_step_changes_only_the_active_groups_adapter_and_projector(env, group):
    model = build_perpeft(env)
    tower = model.item_tower
    assert all(not p.requires_grad for p in tower.adapter_parameters(GLOBAL).values())
    for g in range(N_GROUPS):
        assert all(p.requires_grad for p in group_adapter_params(model, g).values())
    assert not any(p.requires_grad for p in tower.projector.parameters())
    assert not any(p.requires_grad for p in model.global_item_id_embedding.parameters())
    assert not any(p.requires_grad for p in model.global_backbone.parameters())
    assert not any(p.requires_grad for p in tower.global_placeholders.parameters())
    assert all(p.requires_grad for p in tower.placeholders.parameters())  # shared, trained in stage 2

    config = perpeft_config(env)
    loader = GroupedUserSequenceDataLoader(
        config, env.train_dataset, SequenceNegativeSampler(env.train_dataset.item_num, 0), env.groups.labels,
        shuffle=False,
    )  # fmt: skip
    batch = next(b for b in loader if int(b[GROUP_ID][0]) == group)
    optimizer = PEFTTrainer(config, model).optimizer
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.eval()
    global_table = model.group_table(None).clone()

    model.train()
    optimizer.zero_grad()
    model.calculate_loss(batch).backward()
    optimizer.step()

    assert tower.active_group == group
    # activate() left the flags as they were: global adapter frozen, every group adapter trainable.
    assert all(not p.requires_grad for p in tower.adapter_parameters(GLOBAL).values())
    assert all(p.requires_grad for g in range(N_GROUPS) for p in group_adapter_params(model, g).values())
    params = dict(model.named_parameters())
    changed = {part_of(n, N_GROUPS) for n, p in params.items() if not torch.equal(before[n], p)}
    assert {f"adapter_{group}", f"projector_{group}"} <= changed
    assert changed <= {f"adapter_{group}", f"projector_{group}", "shared"}
    for g in set(range(N_GROUPS)) - {group}:  # inactive groups take no gradient at all
        assert all(p.grad is None for p in group_adapter_params(model, g).values())
        assert all(p.grad is None for p in tower.group_projectors[g].parameters())

    # The global path serving new users (stage-1 item vectors) is untouched by stage-2 training.
    model.eval()
    torch.testing.assert_close(model.group_table(None), global_table, rtol=0, atol=0)


# --- 3. groups diverge ------------------------------------------------------------------------------------------


def test_after_stage2_groups_give_different_item_vectors(env, stage2):
    model = stage2.model
    assert isinstance(stage2.samplers[0], GroupNegativeSampler)  # default: group negatives (§3.3.4)
    tables = model.group_tables()
    stage1 = env.global_model.item_table()
    for a in range(N_GROUPS):
        assert (tables[a] - stage1)[1:].abs().max() > 1e-4  # every group moved away from stage 1 ...
        for b in range(a + 1, N_GROUPS):
            assert (tables[a] - tables[b])[1:].abs().max() > 1e-4  # ... each its own way
    for a in range(N_GROUPS):
        adapters = [group_adapter_params(model, g) for g in range(N_GROUPS)]
        for b in range(a + 1, N_GROUPS):
            assert any(not torch.equal(adapters[a][k], adapters[b][k]) for k in adapters[a])
    assert set(stage2.test_result) == {"hit@5", "hit@10", "ndcg@5", "ndcg@10"}


# --- 4. checkpoints ----------------------------------------------------------------------------------------------


def test_checkpoint_holds_every_adapter_but_no_frozen_weights_and_round_trips(env, stage2, tmp_path):
    model = stage2.model
    state = model.state_dict()
    parts = {part_of(k, N_GROUPS) for k in state if k in dict(model.named_parameters())}
    expected = {f"adapter_{g}" for g in range(N_GROUPS)} | {f"projector_{g}" for g in range(N_GROUPS)}
    assert expected | {"global_adapter", "global_projector", "global_copies", "shared"} == parts
    assert "group_of_user" in state
    foundation_keys = [k for k in state if k.startswith("item_tower.foundation.")]
    assert foundation_keys and all("lora_" in k for k in foundation_keys)  # no frozen base weights
    frozen = [n for n in dict(model.named_parameters()) if part_of(n, N_GROUPS) == "foundation_frozen"]
    assert frozen and not set(frozen) & state.keys()

    on_disk = torch.load(stage2.trainer.saved_model_file, weights_only=True)
    assert on_disk["config"]["model"] == "PerPEFT" and on_disk["state_dict"].keys() == state.keys()

    torch.save(state, tmp_path / "perpeft.pth")
    loaded = torch.load(tmp_path / "perpeft.pth", weights_only=True)
    fresh = build_perpeft(env, load=False, seed=7)
    fresh.eval()
    fresh.group_tables()  # tables of the untrained model, cached: loading must not leave them stale
    fresh.load_state_dict(loaded)
    interaction = next(iter(env.test_data))[0]
    torch.testing.assert_close(fresh.full_sort_predict(interaction), model.full_sort_predict(interaction))
    for group in [*range(N_GROUPS), None]:
        torch.testing.assert_close(fresh.group_table(group), model.group_table(group))


# --- 5. users never seen in training ------------------------------------------------------------------------


def test_recommend_for_a_new_history_uses_its_groups_table(env, stage2):
    model = stage2.model
    n_items, max_len = model.n_items, model.max_seq_length
    histories = [[3, 7, 12, 5], [20, 21, 22, 23, 24, 25, 26], list(range(1, 16)), [30]]  # one over max_len
    # And a copy of one training user's history per group, so that every group's table is used.
    user_ids, train_histories, lengths = training_histories(env.train_dataset, max_len)
    for group in range(N_GROUPS):
        row = int(np.flatnonzero(env.groups.labels[user_ids.numpy()] == group)[0])
        histories.append(train_histories[row, : lengths[row]].tolist())
    seen_groups = set()
    for history in histories:
        items, group = model.recommend(history, k=5)
        assert len(items) == 5 and len(set(items)) == 5 and all(1 <= i < n_items for i in items)
        seq, length = padded(history, max_len)
        # The group: the grouping's rule applied to the stage-1 interest vector (what the groups were fitted on).
        batch = Interaction({model.ITEM_SEQ: seq, model.ITEM_SEQ_LEN: length})
        stage1_interest = env.global_model.user_vectors(batch).detach()
        torch.testing.assert_close(model.interest_vectors(seq, length), stage1_interest)
        assert group == int(env.groups.assign(stage1_interest.numpy())[0])
        assert group == int(model.user_groups.assign(model.interest_vectors(seq, length).numpy())[0])
        # The items: top-k of that group's table under the shared sequence encoder.
        table = manual_table(model, group)
        scores = (manual_user_vector(model, seq, length, table) @ table.T)[0]
        scores[0] = -torch.inf
        assert items == torch.topk(scores, 5).indices.tolist()
        seen_groups.add(group)
    assert seen_groups == set(range(N_GROUPS)), seen_groups  # the histories reach every group
    assert len(model.recommend(histories[0], k=10)[0]) == 10


def test_training_users_are_reassigned_to_their_own_group(env, stage2):
    """After stage 2, a training user's history through the unseen-user path lands in its fitted group."""
    model = stage2.model
    user_ids, histories, lengths = training_histories(env.train_dataset, model.max_seq_length)
    for user, history, length in zip(user_ids.tolist(), histories, lengths.tolist(), strict=True):
        _, group = model.recommend(history[:length].tolist(), k=5)
        assert group == env.groups.labels[user], user


def test_saved_tables_serve_recommendations_without_the_foundation_model(env, stage2, tmp_path):
    model = stage2.model
    histories = [[3, 7, 12, 5], [20, 21, 22, 23, 24, 25, 26], [30, 2]]
    expected = [model.recommend(h, k=10) for h in histories]
    model.save_tables(str(tmp_path / "tables.pt"))
    tables = torch.load(tmp_path / "tables.pt", weights_only=True)
    assert tables["groups"].shape == (N_GROUPS, model.n_items, env.config["hidden_size"])

    fresh = build_perpeft(env, load=False, seed=3)
    fresh.load_state_dict(model.state_dict())
    fresh.set_groups(UserGroups.from_state(env.groups.to_state()))
    fresh.eval()
    fresh.load_tables(str(tmp_path / "tables.pt"))

    def no_foundation(items):
        raise AssertionError("the foundation model ran although the tables were loaded")

    fresh.item_tower.forward = no_foundation
    assert [fresh.recommend(h, k=10) for h in histories] == expected


# --- 6. full ranking of known users --------------------------------------------------------------------------


def test_full_sort_predict_scores_each_user_with_its_groups_table(env, stage2):
    model = stage2.model
    interaction = next(iter(env.test_data))[0]
    scores = model.full_sort_predict(interaction)
    users = interaction[model.USER_ID]
    assert scores.shape == (len(users), model.n_items)
    tables = {g: manual_table(model, g) for g in range(N_GROUPS)}
    seq, lengths = interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN]
    assert len({int(env.groups.labels[u]) for u in users}) == N_GROUPS  # the batch mixes groups
    for row, user in enumerate(users.tolist()):
        group = int(env.groups.labels[user])
        own = manual_user_vector(model, seq[row : row + 1], lengths[row : row + 1], tables[group]) @ tables[group].T
        torch.testing.assert_close(scores[row], own[0])
        other = tables[1 - group]
        wrong = manual_user_vector(model, seq[row : row + 1], lengths[row : row + 1], other) @ other.T
        assert not torch.allclose(scores[row], wrong[0])

    interaction[model.ITEM_ID] = torch.arange(len(users)) % (model.n_items - 1) + 1
    torch.testing.assert_close(
        model.predict(interaction), scores.gather(1, interaction[model.ITEM_ID].unsqueeze(1)).squeeze(1)
    )

    user = int(users[0])
    saved_group = int(model.group_of_user[user])
    model.group_of_user[user] = -1
    try:
        with pytest.raises(ValueError, match="without a group"):
            model.full_sort_predict(interaction)
    finally:
        model.group_of_user[user] = saved_group


# --- 7. parameter accounting and configuration errors ---------------------------------------------------------


def test_trainable_parameters_split_into_group_specific_and_global_parts(env):
    model = build_perpeft(env)
    tower = model.item_tower
    counts = trainable_parameters_by_component(model)
    adapter_size = sum(p.numel() for p in tower.adapter_parameters(GLOBAL).values())
    projector_size = sum(p.numel() for p in tower.projector.parameters())
    assert adapter_size > 0 and projector_size > 0
    for g in range(N_GROUPS):
        assert sum(p.numel() for p in group_adapter_params(model, g).values()) == adapter_size
    assert counts["group_specific/peft_adapters"] == N_GROUPS * adapter_size
    assert counts["group_specific/projectors"] == N_GROUPS * projector_size
    assert counts["global/item_id_embedding"] == model.n_items * env.config["hidden_size"]
    assert counts["global/backbone"] == sum(p.numel() for p in model.backbone.parameters())
    assert counts["global/missing_modality_placeholders"] == sum(p.numel() for p in tower.placeholders.parameters())
    assert counts["total"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["total"] == sum(v for k, v in counts.items() if k not in ("total", "foundation_model_frozen"))
    frozen = sum(p.numel() for n, p in model.named_parameters() if part_of(n, N_GROUPS) == "foundation_frozen")
    assert counts["foundation_model_frozen"] == frozen > 0


def test_perpeft_without_a_peft_module_is_refused(env):
    with pytest.raises(ValueError, match="peft_type"):
        build_perpeft(env, load=False, peft_type=None)
    # Only the image tower, which is left frozen: nothing to personalise.
    with pytest.raises(ValueError, match="PerPEFT needs a PEFT module"):
        build_perpeft(env, load=False, modalities=["image"], adapt_image_tower=False)


# --- 10. ablation switches -------------------------------------------------------------------------------------


def test_without_group_negatives_stage2_samples_from_all_items(env, tmp_path):
    config = copy.copy(env.config)
    config.final_config_dict = dict(env.config.final_config_dict, group_negatives=False,
                                    checkpoint_dir=str(tmp_path / "saved"))  # fmt: skip
    run = run_stage2(env, config, saved=False)
    assert len(run.samplers) == 1
    assert type(run.samplers[0]) is SequenceNegativeSampler


def test_weight_decay_grid_trains_stage2_per_value_and_keeps_the_best_validation(env, monkeypatch, tmp_path):
    decays = []
    original = TwoStageTrainer._restart_stage2

    def spy(self, weight_decay, saved_model_file):
        original(self, weight_decay, saved_model_file)
        decays.append(self.optimizer.param_groups[0]["weight_decay"])

    monkeypatch.setattr(TwoStageTrainer, "_restart_stage2", spy)
    config = copy.copy(env.config)
    config.final_config_dict = dict(env.config.final_config_dict, weight_decay_grid=[0.0, 0.5],
                                    checkpoint_dir=str(tmp_path / "saved"))  # fmt: skip
    run = run_stage2(env, config)
    trainer, best_valid = run.trainer, run.best_valid
    assert decays == [0.0, 0.5]
    valid = trainer.tuning["valid_by_weight_decay"]
    assert set(valid) == {"0.0", "0.5"}
    metric = config["valid_metric"].lower()
    assert best_valid[metric] == max(v[metric] for v in valid.values())
    assert valid[str(trainer.tuning["weight_decay"])] == best_valid
    assert trainer.saved_model_file.endswith(f"-wd{trainer.tuning['weight_decay']:g}.pth")
    # The model holds the chosen run's best weights.
    best = torch.load(trainer.saved_model_file, weights_only=True)["state_dict"]
    for key, value in run.model.state_dict().items():
        assert torch.equal(value, best[key]), key


@pytest.mark.parametrize("method", ["gmm", "random"])
def test_other_grouping_methods_run_through_group_users(env, method):
    config = copy.copy(env.config)
    config.final_config_dict = dict(env.config.final_config_dict, grouping_method=method, n_groups=3)
    groups = group_users(env.global_model, env.train_dataset, config)
    assert groups.method == method and 1 <= groups.n_groups <= 3
    users = training_histories(env.train_dataset, 1)[0].numpy()
    assert (groups.labels[users] >= 0).all() and groups.labels[0] == -1
    assert sum(groups.sizes()) == len(users) == N_USERS
    if method == "gmm":
        assert groups.gmm_means is not None and groups.gmm_means.shape[0] == groups.n_groups
    again = group_users(env.global_model, env.train_dataset, config)
    assert np.array_equal(again.labels, groups.labels)  # seeded
    model = build_perpeft(env, load=False, n_groups=groups.n_groups)
    model.load_global(env.global_model.state_dict(), groups)  # a PerPEFT can be built on these groups
    assert model.item_tower.n_groups == groups.n_groups


# --- 8. the command line: two stages, stage 2 only, resume -------------------------------------------------------


@pytest.fixture(scope="module")
def cli_data(env, tmp_path_factory):
    """80 users, so that a 50% user sample keeps enough to split and group."""
    root = tmp_path_factory.mktemp("cli-data")
    return make_atomic_dataset(root, E2E_DATASET, n_users=80, n_items=N_ITEMS)


def cli_config_file(tmp_path, env, cli_data) -> str:
    keys = two_stage_keys(tmp_path, cli_data, env.clip_path)
    for key in ("epochs", "data_path", "n_groups", "stage1_epochs", "stage2_epochs"):  # given as flags
        keys.pop(key)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(keys))
    return str(path)


@pytest.mark.slow
def test_command_line_two_stages_then_stage2_only_then_resume(env, cli_data, tmp_path):
    common = ["--model=PerPEFT", f"--dataset={E2E_DATASET}", f"--data_path={cli_data['data_path']}",
              f"--config_files={cli_config_file(tmp_path, env, cli_data)}", "--user_sample_ratio=0.5",
              "--n_groups=2"]  # fmt: skip

    # Both stages.
    first_file = tmp_path / "first.json"
    proc = run_script([*common, "--stage1_epochs=1", "--stage2_epochs=1", f"--checkpoint_dir={tmp_path / 'run1'}",
                       f"--result_file={first_file}"], cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = proc.stdout + proc.stderr
    assert "Stage 1: GlobalPEFT, 1 epochs" in log and "Stage 2: PerPEFT, 1 epochs" in log
    first = json.loads(first_file.read_text())
    assert first["model"] == "PerPEFT" and first["config"]["user_sample_ratio"] == 0.5
    assert {"hit@5", "hit@10"} <= set(first["test_result"])
    assert all(0.0 <= first["test_result"][m] <= 1.0 for m in ("hit@5", "hit@10"))
    kept = int(re.search(r"kept (\d+) of 80 users", log).group(1))
    assert kept == 40
    config = Config(model="PerPEFT", dataset=E2E_DATASET,
                    config_dict={**yaml.safe_load((tmp_path / "tiny.yaml").read_text()),
                                 "data_path": cli_data["data_path"], "user_sample_ratio": 0.5})  # fmt: skip
    n_users = create_dataset(config).user_num - 1  # after the sample and 5-core filtering
    groups = first["groups"]
    assert groups["method"] == "kmeans" and groups["n_groups"] == 2
    assert len(groups["sizes"]) == 2 and min(groups["sizes"]) > 0 and sum(groups["sizes"]) == n_users
    counts = first["trainable_parameters"]
    for key in ("group_specific/peft_adapters", "group_specific/projectors", "global/item_id_embedding",
                "global/backbone", "foundation_model_frozen", "total"):  # fmt: skip
        assert counts[key] > 0, key
    assert counts["per_group"]["peft_adapter"] * 2 == counts["group_specific/peft_adapters"]
    assert counts["per_group"]["projector"] * 2 == counts["group_specific/projectors"]
    seconds = first["seconds"]
    assert seconds["stage1_train"] > 0 and seconds["stage2_train"] > 0
    assert len(seconds["stage1_per_epoch"]) == 1 and len(seconds["stage2_per_epoch"]) == 1
    stage1_file, stage2_file = first["global_checkpoint"], first["checkpoint"]
    assert os.path.dirname(stage1_file) == os.path.dirname(stage2_file) == str(tmp_path / "run1")
    assert torch.load(stage1_file, weights_only=True)["config"]["model"] == "GlobalPEFT"
    assert torch.load(stage2_file, weights_only=True)["config"]["model"] == "PerPEFT"
    assert os.path.isfile(first["groups_file"])
    saved_groups = UserGroups.from_state(torch.load(first["groups_file"], weights_only=True))
    assert saved_groups.sizes() == groups["sizes"]

    # Stage 2 only, from the stage-1 checkpoint.
    second_file = tmp_path / "second.json"
    proc = run_script([*common, "--stage1_epochs=1", "--stage2_epochs=1", f"--global_checkpoint={stage1_file}",
                       f"--checkpoint_dir={tmp_path / 'run2'}", f"--result_file={second_file}"],
                      cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = proc.stdout + proc.stderr
    assert "Stage 1: GlobalPEFT, 1 epochs" not in log and "not retrained" in log
    second = json.loads(second_file.read_text())
    assert second["global_checkpoint"] == stage1_file and "stage1_train" not in second["seconds"]
    assert second["groups"]["sizes"] == groups["sizes"]  # the same stage-1 model groups the same way
    assert os.path.dirname(second["checkpoint"]) == str(tmp_path / "run2")

    # Resume stage 2 from the first run's checkpoint: one more epoch.
    third_file = tmp_path / "third.json"
    proc = run_script([*common, "--stage1_epochs=1", "--stage2_epochs=2", f"--resume={stage2_file}",
                       f"--result_file={third_file}"], cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = proc.stdout + proc.stderr
    assert "Stage 1: GlobalPEFT" not in log and "Stage 2: PerPEFT, 2 epochs" in log
    third = json.loads(third_file.read_text())
    assert third["checkpoint"] == stage2_file and third["groups_file"] == first["groups_file"]
    assert third["groups"]["sizes"] == groups["sizes"]
    # Complete: epoch 0's seconds come from the checkpoint, stage 1's from the file beside it.
    assert len(third["seconds"]["stage2_per_epoch"]) == 2
    assert third["seconds"]["stage1_train"] == first["seconds"]["stage1_train"]
    assert third["global_checkpoint"] == stage1_file
    assert torch.load(stage2_file, weights_only=True)["epoch"] == 1


# --- 9. too many groups ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_groups", [1000, 0])
def test_bad_n_groups_exits_before_stage_1_naming_n_groups(env, tmp_path, n_groups):
    keys = two_stage_keys(tmp_path, env.data_keys, env.clip_path)
    argv = ["--model=PerPEFT", f"--dataset={DATASET}", f"--data_path={keys['data_path']}",
            f"--load_col={keys['load_col']}", "--text_field=title", f"--image_dir={keys['image_dir']}",
            f"--cache_dir={keys['cache_dir']}", f"--checkpoint_dir={keys['checkpoint_dir']}",
            "--foundation_model=clip", f"--clip_path={env.clip_path}", "--show_progress=False",
            "--hidden_size=16", "--inner_size=32", "--n_heads=2", "--projector_hidden_size=32",
            "--topk=[5, 10]", "--valid_metric=hit@10", "--stage1_epochs=1", f"--n_groups={n_groups}"]  # fmt: skip
    with pytest.raises(SystemExit) as info:
        load_entry_point().main(argv)
    message = info.value.code
    assert isinstance(message, str) and message.startswith("error: ")  # exit status 1
    if n_groups:  # above the number of users: checked against the data
        assert f"n_groups={n_groups}" in message and f"{N_USERS} users" in message
    else:  # not a positive integer: refused with the key's declared range before the data is read
        assert "n_groups must be a positive integer" in message and "got 0" in message
    assert not list(Path(keys["checkpoint_dir"]).glob("PerPEFT-*"))  # refused before stage 1 trained


def test_adapter_learning_rate_covers_every_groups_adapter_in_stage2(env):
    config = perpeft_config(env, adapter_learning_rate=3e-3)
    model = build_perpeft(env, adapter_learning_rate=3e-3)
    adapter_group, rest_group = PEFTTrainer(config, model).optimizer.param_groups
    in_adapter_group = {id(p) for p in adapter_group["params"]}
    tower = model.item_tower
    for group in range(env.groups.n_groups):
        params = tower.family.group_parameters(group)
        assert params and all(id(p) in in_adapter_group for p in params)
    assert len(in_adapter_group) == sum(len(tower.family.group_parameters(g)) for g in range(env.groups.n_groups))
    assert adapter_group["lr"] == 3e-3 and rest_group["lr"] == config["learning_rate"]
