"""A new adapter family needs no change to the package (docs/extending.md): a toy family registered
here, by name, with its defaults, runs in GlobalPEFT on the tiny CLIP, trains, and gets PerPEFT's
per-group copies; plus the registry's errors and the family-defaults precedence."""

from __future__ import annotations

import logging

import pytest
import torch
import yaml
from torch import nn

from recbole_perpeft.adapters import (
    ModuleFamily,
    family_settings,
    get_adapter_family,
    register_adapter_family,
    registry,
)
from recbole_perpeft.adapters.frozen import FrozenFeatures, frozen_features
from tests.tiny import build_config, build_model, make_atomic_dataset, make_tiny_clip, quick_config

DATASET = "toyds"


# --- the toy family: all a new adapter method needs --------------------------------------------------------


class ToyNetwork(nn.Module):
    """Per modality, a learned per-dimension scale of the frozen vector."""

    def __init__(self, dims: dict[str, int], scale: float):
        super().__init__()
        self.scales = nn.ParameterDict({m: nn.Parameter(torch.full((d,), float(scale))) for m, d in dims.items()})

    def forward(self, vectors: dict) -> dict:
        return {m: v * self.scales[m] for m, v in vectors.items()}


@register_adapter_family("TOY", defaults={"toy_scale": 1.0})
class ToyFamily(ModuleFamily):
    """Frozen foundation vectors (cached on disk), times a ToyNetwork; one copy per PerPEFT group."""

    def __init__(self, config, tower, store):
        dims = {m: tower.foundation.out_dims[m] for m in tower.modalities}
        super().__init__(config, tower, store, ToyNetwork(dims, self.settings(config)["toy_scale"]))
        encode = lambda m, items: self.foundation.encode(m, tower.item_inputs(m, items))  # noqa: E731
        self.features = FrozenFeatures({m: frozen_features(tower, store, m, encode) for m in tower.modalities})
        self.out_dims, self.modality_dims = dict(dims), dict(dims)

    def modules(self) -> dict[str, nn.Module]:
        return {**super().modules(), "features": self.features}

    def encode(self, items: torch.Tensor) -> tuple[dict, dict]:
        vectors = self.active_network({m: getattr(self.features, m)[items] for m in self.tower.modalities})
        return vectors, vectors


# --- in a model ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    clip = make_tiny_clip(root / "clip")
    data_keys = make_atomic_dataset(root / "data", DATASET, n_users=20, n_items=25, missing_images=("103",))
    return quick_config(root, **data_keys, foundation_model="clip", clip_path=clip.path, peft_type="toy",
                        topk=[5, 10], valid_metric="hit@10", learning_rate=1e-2)  # fmt: skip


def test_toy_family_trains_in_globalpeft(toy_keys):
    # The family's own key, from the user (a key no property file declares: listed in extra_keys).
    keys = {**toy_keys, "toy_scale": 0.5, "extra_keys": ["toy_scale"]}
    _, model, train_data, _, _ = build_model("GlobalPEFT", DATASET, keys)
    tower = model.item_tower
    assert isinstance(tower.family, ToyFamily) and isinstance(tower.side, ToyNetwork)
    assert all(torch.equal(s, torch.full_like(s, 0.5)) for s in tower.side.scales.values())
    assert tower.peft_models == [] and not any(p.requires_grad for p in tower.foundation.parameters())
    assert tower.modality_dims == tower.family.out_dims == {"text": 16, "image": 16}
    assert model.parameter_components()["side_network"] is tower.side
    assert not any(tower.is_adapter_key(n) for n, _ in tower.foundation.named_parameters())

    before = {m: s.detach().clone() for m, s in tower.side.scales.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model.calculate_loss(next(iter(train_data))).backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in tower.side.scales.values())
    optimizer.step()
    assert all(not torch.equal(before[m], s) for m, s in tower.side.scales.items())
    model.eval()
    assert model.item_table().shape == (model.n_items, keys["hidden_size"])


def test_toy_family_gets_per_group_copies(toy_keys):
    _, model, *_ = build_model("GlobalPEFT", DATASET, toy_keys)
    tower = model.item_tower
    items = torch.arange(1, model.n_items)
    model.eval()
    with torch.no_grad():
        global_vectors = tower(items)
    tower.add_groups(2)
    names = dict(model.named_parameters())
    assert "item_tower.group_sides.1.scales.text" in names  # registered on the tower: checkpointed
    assert not any(p.requires_grad for p in tower.side.parameters())  # the global adapter: frozen
    for group in range(2):
        params = tower.group_adapter_parameters(group)
        assert params and all(p.requires_grad for p in params)
        assert all(torch.equal(p, q) for p, q in zip(params, tower.side.parameters(), strict=True))

    with torch.no_grad():
        tower.group_adapter_parameters(1)[0].mul_(3.0)  # group 1 moves away from the global adapter
        tower.activate(1)
        assert tower.active_group == 1 and not torch.allclose(tower(items), global_vectors)
        tower.activate(0)
        torch.testing.assert_close(tower(items), global_vectors)  # group 0: still the copy
        tower.activate(None)
        torch.testing.assert_close(tower(items), global_vectors)
    tower.activate(0)
    tower(items).sum().backward()
    assert all(p.grad is not None for p in tower.group_adapter_parameters(0))
    assert all(p.grad is None for p in tower.group_adapter_parameters(1))  # inactive: no gradient

    tower.copy_global_to_groups()
    copied = zip(tower.group_adapter_parameters(1), tower.side.parameters(), strict=True)
    assert all(torch.equal(p, q) for p, q in copied)
    with pytest.raises(ValueError, match="group 2"):
        tower.activate(2)


# --- the registry and the defaults --------------------------------------------------------------------------


def test_lookup_is_by_name_case_insensitive_and_unknown_names_list_every_family():
    assert get_adapter_family("toy") is ToyFamily and ToyFamily.name == "TOY"
    with pytest.raises(ValueError) as info:
        get_adapter_family("NOPE")
    message = str(info.value)
    for name in ("TOY", "IISAN", "CROSSAN", "MODA", "FROZEN", "LORA", "IA3", "LOHA"):
        assert name in message

    class Other(ModuleFamily):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_adapter_family("TOY")(Other)


def test_a_family_without_a_rank_scales_only_the_projector(caplog):
    with caplog.at_level(logging.WARNING):
        assert ToyFamily.scaled({"peft_type": "TOY"}, 4) == ({}, {})
    assert "TOY has no rank r" in caplog.text


def test_defaults_from_a_yaml_file_under_the_users_keys(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "ADAPTER_FAMILIES", dict(registry.ADAPTER_FAMILIES))
    path = tmp_path / "TOY_YAML.yaml"
    path.write_text(yaml.safe_dump({"toy_scale": 2.0, "toy_layers": None, "peft_config": {"r": 4, "a": 1}}))
    register_adapter_family("TOY_YAML", defaults=path)(type("ToyYaml", (ToyFamily,), {}))
    assert family_settings("toy_yaml", {}) == {"toy_scale": 2.0, "toy_layers": None, "peft_config": {"r": 4, "a": 1}}
    # A 0 is a value, a ~ the default; mappings merge key by key.
    settings = family_settings("TOY_YAML", {"toy_scale": 0, "toy_layers": None, "peft_config": {"r": 8}})
    assert settings == {"toy_scale": 0, "toy_layers": None, "peft_config": {"r": 8, "a": 1}}


def test_built_in_family_keys_rank_the_user_over_the_family_yaml_over_property_files(toy_keys):
    iisan = get_adapter_family("IISAN")
    config = build_config("GlobalPEFT", DATASET, {**toy_keys, "peft_type": "IISAN", "side_width": 8})
    settings = iisan.settings(config)
    assert settings["side_width"] == 8 and settings["side_adapter_size"] == 32 and settings["side_blocks"] is None
    # A model/overall property file's value is under properties/adapter/IISAN.yaml, a user's over it.
    config.internal_config_dict["side_adapter_size"] = config.final_config_dict["side_adapter_size"] = 7
    assert iisan.settings(config)["side_adapter_size"] == 32
    config.external_config_dict["side_adapter_size"] = 7
    assert iisan.settings(config)["side_adapter_size"] == 7


def test_peft_defaults_from_the_yaml_and_the_deprecated_peft_defaults_key(caplog):
    lora = get_adapter_family("LORA")
    kwargs, targets = lora.peft_kwargs({"peft_config": {"lora_dropout": 0.1}}, "LORA")
    assert kwargs == {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1}
    assert targets["bert"] == {"target_modules": ["query", "value"]}
    with caplog.at_level(logging.WARNING):
        kwargs, _ = lora.peft_kwargs({"peft_defaults": {"LORA": {"r": 2}}, "peft_config": None}, "LORA")
    assert kwargs["r"] == 2 and "peft_defaults is deprecated" in caplog.text and "LORA.yaml" in caplog.text
    # A peft method without a YAML: peft's own defaults (LoHa's r) decide what LargeGlobalPEFT scales.
    assert lora.scaled({"peft_type": "LOHA"}, 3)[1] == {"r": (8, 24), "alpha": (8, 24)}
