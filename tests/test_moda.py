"""MoDA: shared low-rank experts mixed by a per-adapter, per-condition softmax gate (adapters/moda.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import BertConfig, BertModel

from recbole_perpeft.adapters import MoDAConfig, MoDALinear, attach_peft, build_peft_config, is_moda, set_condition


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        return self.out(torch.relu(self.lin(x)))


def moda(**kwargs) -> MoDAConfig:
    return MoDAConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["lin"], **kwargs})


def randomize(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_one_expert_equals_lora():
    base = Net()
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["lin"]))
    ours = get_peft_model(copy.deepcopy(base), moda(n_experts=1))
    lora_layer, layer = lora.base_model.model.lin, ours.base_model.model.lin
    assert isinstance(layer, MoDALinear) and not isinstance(lora_layer, MoDALinear)
    with torch.no_grad():
        lora_layer.lora_B["default"].weight.normal_()
        layer.moda_A["default"].weight.copy_(lora_layer.lora_A["default"].weight)
        layer.moda_B["default"].weight.copy_(lora_layer.lora_B["default"].weight)
    x = torch.randn(7, 6)
    torch.testing.assert_close(ours(x), lora(x))
    assert not torch.allclose(ours(x), base(x))  # the adapter does contribute


def test_gate_is_a_softmax_per_condition():
    model = get_peft_model(Net(), moda(n_experts=2, n_conditions=3, condition_dim=4, init_lora_weights=False))
    layer = model.base_model.model.lin
    weights = layer.gate_weights()
    assert weights.shape == (3, 2)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3))  # zero-init gate: uniform
    torch.testing.assert_close(weights, torch.full((3, 2), 0.5))
    randomize(layer.moda_gate["default"])
    weights = layer.gate_weights()
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(3))
    assert not torch.allclose(weights[0], weights[1])
    x = torch.randn(4, 6)
    outputs = []
    for condition in range(3):
        set_condition(model, condition)
        assert layer.condition == condition
        outputs.append(model(x))
    assert not torch.allclose(outputs[0], outputs[1]) and not torch.allclose(outputs[1], outputs[2])


def test_named_adapters_share_one_expert_pool():
    cfg = moda(n_experts=2, n_conditions=2, condition_dim=3, init_lora_weights=False)
    model = get_peft_model(Net(), cfg)
    layer = model.base_model.model.lin
    before = dict(model.named_parameters())
    model.add_adapter("group_0", cfg)
    after = dict(model.named_parameters())
    new = sorted(set(after) - set(before))
    gate_size = 2 * 3 + 3 * 2 + 2  # embedding + proj weight + proj bias
    assert sum(after[n].numel() for n in new) == gate_size
    assert all(".moda_gate.group_0." in n for n in new)
    assert list(layer.moda_A) == list(layer.moda_B) == ["default"]
    assert {n for n in after if ".moda_A." in n or ".moda_B." in n} == {
        "base_model.model.lin.moda_A.default.weight",
        "base_model.model.lin.moda_B.default.weight",
    }
    assert list(layer.moda_gate) == ["default", "group_0"]

    randomize(layer.moda_gate["group_0"])
    x = torch.randn(4, 6)
    default_out = model(x)
    model.set_adapter("group_0")
    assert not torch.allclose(model(x), default_out)
    assert layer.moda_A["default"].weight.requires_grad  # the pool follows whichever adapter is active

    for name, p in model.named_parameters():  # as the caller does: every adapter trainable
        p.requires_grad_("moda_" in name)
    model(x).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "moda_" in n}
    for name in ("moda_A.default.weight", "moda_B.default.weight", "moda_gate.group_0.proj.weight"):
        grad = grads[f"base_model.model.lin.{name}"]
        assert grad is not None and grad.abs().sum() > 0, name
    assert all(g is None for n, g in grads.items() if ".moda_gate.default." in n)


def test_bad_rank_and_condition_raise():
    with pytest.raises(ValueError, match="n_experts"):
        moda(n_experts=3)
    model = get_peft_model(Net(), moda(n_experts=2, n_conditions=2))
    with pytest.raises(ValueError, match="n_experts"):
        model.add_adapter("group_0", moda(n_experts=4))  # must share the pool's split
    for bad in (2, -1):
        with pytest.raises(ValueError, match=r"condition must be in \[0, 2\)"):
            set_condition(model, bad)
    assert model.base_model.model.lin.condition == 0  # unchanged
    with pytest.raises(ValueError, match="no MoDA layers"):
        set_condition(Net(), 0)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_and_unload()


def test_attach_moda_to_tiny_bert():
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    module = BertModel(config)
    overrides = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "n_experts": 2, "n_conditions": 2, "condition_dim": 4}
    assert isinstance(build_peft_config("MoDA", "bert", overrides), MoDAConfig)
    handle = attach_peft(module, "moda", overrides)
    assert is_moda(handle) and is_moda(module)
    for layer in module.encoder.layer:
        attention = layer.attention.self
        assert isinstance(attention.query, MoDALinear) and isinstance(attention.value, MoDALinear)
        assert not isinstance(attention.key, MoDALinear)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all(".moda_" in n for n in trainable)
    assert len(trainable) == 2 * 2 * 5  # layers x (query, value) x (A, B, embedding, proj w, proj b)

    set_condition(handle, 1)
    ids = torch.randint(0, 100, (3, 5))
    module(input_ids=ids).last_hidden_state.sum().backward()
    b_grads = [p.grad for n, p in module.named_parameters() if ".moda_B." in n]
    assert b_grads and all(g is not None and g.abs().sum() > 0 for g in b_grads)

    lora = attach_peft(BertModel(config), "lora", {"r": 4})
    assert not is_moda(lora)
