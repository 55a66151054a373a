"""The adapter families (IISAN, CROSSAN side networks; MoDA) inside the models: the hidden-state cache
in a model, no foundation call or gradient with a side network, the extra losses (CMSA, in-batch
cross-entropy), and short GlobalPEFT / PerPEFT runs of each family on a tiny CLIP and on the real
MiniLM + EfficientNet-Lite0 pair."""

from __future__ import annotations

import json

import pytest
import torch
from recbole.data.interaction import Interaction

from recbole_perpeft.adapters.moda import MoDAFamily
from recbole_perpeft.data.dataloader import GROUP_ID
from recbole_perpeft.encoders.clip import ClipFoundation
from recbole_perpeft.encoders.text_image import TextImageFoundation
from recbole_perpeft.quick_start import run
from tests.tiny import build_model, make_atomic_dataset, make_tiny_clip, quick_config

DATASET = "familyds"
FAMILIES = ["iisan", "crossan", "moda"]  # lower case, as in the issue's --peft_type=iisan


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    clip = make_tiny_clip(root / "clip")
    # One item without an image and one without a title: placeholders take part.
    data_keys = make_atomic_dataset(root / "data", DATASET, n_users=24, n_items=30, missing_images=(3,),
                                    empty_titles=(5,))  # fmt: skip
    return root, clip.path, data_keys


def family_config(tmp_path, env, foundation: str, peft_type: str, **extra) -> dict:
    _, clip_path, data_keys = env
    keys = quick_config(tmp_path, **data_keys, peft_type=peft_type, topk=[5, 10], valid_metric="hit@10",
                        learning_rate=1e-3, n_groups=2, stage1_epochs=1, stage2_epochs=1)  # fmt: skip
    if foundation == "clip":
        keys.update(foundation_model="clip", clip_path=clip_path, adapt_image_tower=True)
    keys.update(extra)
    return keys


def train_one_batch(model, train_data):
    batch = next(iter(train_data))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    loss = model.calculate_loss(batch)
    loss.backward()
    optimizer.step()
    return loss


def forbid_foundation_calls(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the foundation model ran")

    for cls in (ClipFoundation, TextImageFoundation):
        for name in ("encode", "layer_states"):
            monkeypatch.setattr(cls, name, refuse)


# --- side networks in a model -------------------------------------------------------------------------


@pytest.mark.parametrize("foundation", ["clip", "text_image"])
@pytest.mark.parametrize("peft_type", ["IISAN", "CROSSAN"])
def test_side_network_never_runs_or_trains_the_foundation(foundation, peft_type, tmp_path, env, monkeypatch):
    keys = family_config(tmp_path, env, foundation, peft_type)
    _, model, train_data, _, _ = build_model("GlobalPEFT", DATASET, keys)
    tower = model.item_tower
    assert tower.side is not None and tower.peft_models == [] and tower.adapted == []
    assert not any(p.requires_grad for p in tower.foundation.parameters())
    before = {n: p.detach().clone() for n, p in tower.side.named_parameters()}
    forbid_foundation_calls(monkeypatch)  # the cache was built with the model; from here on, no encoder
    loss = train_one_batch(model, train_data)
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in tower.foundation.parameters())
    assert any(not torch.equal(before[n], p) for n, p in tower.side.named_parameters())
    model.eval()
    assert model.item_table().shape == (model.n_items, keys["hidden_size"])  # evaluation: no encoder either
    counts = model.parameter_components()
    assert counts["side_network"] is tower.side and "peft_adapter" not in counts


@pytest.mark.parametrize("peft_type", ["IISAN", "CROSSAN"])
def test_side_network_on_one_modality(peft_type, tmp_path, env):
    keys = family_config(tmp_path, env, "text_image", peft_type, modalities=["text"])
    _, model, train_data, _, _ = build_model("GlobalPEFT", DATASET, keys)
    assert list(model.item_tower.layer_states) == ["text"]
    assert torch.isfinite(train_one_batch(model, train_data))


def test_hidden_state_cache_is_reused_by_the_next_model(tmp_path, env, monkeypatch):
    keys = family_config(tmp_path, env, "text_image", "IISAN")
    _, first, *_ = build_model("GlobalPEFT", DATASET, keys)
    forbid_foundation_calls(monkeypatch)
    _, second, *_ = build_model("GlobalPEFT", DATASET, dict(keys, peft_type="CROSSAN"))  # same layers: reused
    for m in ("text", "image"):
        a, b = first.item_tower.layer_states[m], second.item_tower.layer_states[m]
        assert a.path == b.path and a.layers == b.layers
    monkeypatch.undo()
    _, third, *_ = build_model("GlobalPEFT", DATASET, dict(keys, side_layers=[-1, -2]))  # other layers: rebuilt
    assert third.item_tower.layer_states["text"].path != first.item_tower.layer_states["text"].path


# --- losses -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name, peft_type", [("GlobalPEFT", "LORA"), ("GlobalPEFT", "IISAN"),
                                                   ("UserLevel2", "CROSSAN")])  # fmt: skip
def test_cmsa_and_in_batch_loss_train(model_name, peft_type, tmp_path, env):
    keys = family_config(tmp_path, env, "text_image", peft_type, cmsa_weight=0.1, loss_type="INBATCH")
    _, model, train_data, _, _ = build_model(model_name, DATASET, keys)
    assert model.alignment is not None and model.loss_type == "INBATCH"
    batch = next(iter(train_data))
    items = torch.unique(batch[model.ITEM_SEQ])
    _, alignment = model.item_vectors_and_alignment(items)
    assert alignment > 0
    loss = train_one_batch(model, train_data)
    assert torch.isfinite(loss)
    assert model.alignment.log_tau.grad is not None
    assert model.log_popularity.shape == (model.n_items,) and torch.isfinite(model.log_popularity).all()


def test_cmsa_needs_two_modalities(tmp_path, env):
    keys = family_config(tmp_path, env, "text_image", "LORA", cmsa_weight=0.1, modalities=["text"])
    with pytest.raises(ValueError, match="cmsa_weight"):
        build_model("GlobalPEFT", DATASET, keys)


def test_unknown_loss_type_is_refused(tmp_path, env):
    with pytest.raises(ValueError, match="loss_type"):
        build_model("GlobalPEFT", DATASET, family_config(tmp_path, env, "text_image", "LORA", loss_type="HINGE"))


# --- MoDA in a model ------------------------------------------------------------------------------------


def test_moda_condition_is_the_modality_and_groups_get_their_own_gate(tmp_path, env):
    keys = family_config(tmp_path, env, "clip", "MODA")
    _, model, train_data, _, _ = build_model("PerPEFT", DATASET, keys)
    tower = model.item_tower
    assert isinstance(tower.family, MoDAFamily)
    gates = {g: tower.adapter_parameters(tower.group_adapter(g)) for g in range(2)}
    assert gates[0] and all("gate" in k for k in gates[0])  # a group's adapter is only its gate
    shared = tower.adapter_parameters(tower.GLOBAL_ADAPTER)
    assert any("gate" not in k for k in shared)  # the expert pool: the global adapter's, frozen in stage 2
    assert not any(p.requires_grad for p in shared.values())
    batch = next(iter(train_data))  # plain batches: route them to group 0 by hand
    batch.update(Interaction({GROUP_ID: torch.zeros(len(batch), dtype=torch.long)}))
    before = {k: v.detach().clone() for k, v in gates[1].items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.calculate_loss(batch).backward()
    assert all(p.grad is not None for p in gates[0].values())
    assert all(p.grad is None for p in gates[1].values())
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in gates[1].items())


# --- every family end to end, GlobalPEFT and PerPEFT --------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("foundation", ["clip", "text_image"])
@pytest.mark.parametrize("peft_type", FAMILIES)
def test_family_runs_under_globalpeft_and_perpeft(foundation, peft_type, tmp_path, env, monkeypatch):
    monkeypatch.chdir(tmp_path)  # RecBole writes log_tensorboard/ in the working directory
    keys = family_config(tmp_path, env, foundation, peft_type)
    for model in ("GlobalPEFT", "PerPEFT"):
        result_file = tmp_path / f"{model}.json"
        run(model, DATASET, config_dict=keys, result_file=str(result_file))
        result = json.loads(result_file.read_text())
        assert {"hit@5", "hit@10"} <= set(result["test_result"])
        params = result["trainable_parameters"]
        side = peft_type != "moda"
        if model == "GlobalPEFT":
            assert params["side_network" if side else "peft_adapter"] > 0
        else:
            assert result["groups"]["n_groups"] == 2
            group_part = "side_network" if side else "peft_adapter"
            assert params["per_group"][group_part] > 0
            assert params[f"group_specific/{group_part}s"] == 2 * params["per_group"][group_part]
