"""``Precision.lowered`` (issue 46): the frozen linear weights cast once for autocast give the very values that
autocast's own per-call cast gives (forward and the adapter's gradients, bit for bit), follow a changed weight,
leave trainable layers and the fp32 precision alone, and put the Parameters back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from recbole_perpeft.adapters.peft_adapter import attach_peft
from recbole_perpeft.model.precision import Precision


class Encoder(nn.Module):
    """Two frozen linear layers with a GELU between, LoRA on the first (the shape of a transformer's block)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.query = nn.Linear(24, 24)
        self.out = nn.Linear(24, 8)

    def forward(self, x):
        return self.out(torch.nn.functional.gelu(self.query(x)))


def lora_encoder():
    model = attach_peft(Encoder(), "LORA", {"target_modules": ["query"], "r": 4, "init_lora_weights": False})
    return model, [model.base_model.model.query.base_layer, model.base_model.model.out]


def run(model, precision, linears, x, lowered: bool):
    model.zero_grad(set_to_none=True)
    with precision.autocast("cpu"), (precision.lowered(linears, "cpu") if lowered else torch.enable_grad()):
        out = model(x)
    out.float().square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads


@pytest.mark.parametrize("dtype", ["bf16"])
def test_lowered_weights_give_autocasts_values_and_follow_a_changed_weight(dtype):
    model, linears = lora_encoder()
    precision, x = Precision(dtype), torch.randn(5, 24)
    reference = run(model, precision, linears, x, lowered=False)
    first = run(model, precision, linears, x, lowered=True)
    assert first[0].dtype == torch.bfloat16
    assert torch.equal(first[0], reference[0])
    assert reference[1] and all(torch.equal(first[1][n], g) for n, g in reference[1].items())
    assert all(type(layer.weight) is nn.Parameter and layer.weight.dtype == torch.float32 for layer in linears)

    with torch.no_grad():  # a reloaded frozen weight: the cached copy must not be used any more
        linears[1].weight.mul_(2)
    changed = run(model, precision, linears, x, lowered=True)
    assert torch.equal(changed[0], run(model, precision, linears, x, lowered=False)[0])
    assert not torch.equal(changed[0], first[0])


def test_trainable_layers_and_fp32_are_left_alone():
    model, linears = lora_encoder()
    linears[1].weight.requires_grad_(True)
    precision = Precision("bf16")
    seen = {}

    def record(module, args):
        seen[module] = module.weight.dtype

    hooks = [layer.register_forward_pre_hook(record) for layer in linears]
    with precision.autocast("cpu"), precision.lowered(linears, "cpu"):
        model(torch.randn(2, 24))
    assert seen == {linears[0]: torch.bfloat16, linears[1]: torch.float32}
    with Precision("fp32").autocast("cpu"), Precision("fp32").lowered(linears, "cpu"):
        model(torch.randn(2, 24))
    assert seen[linears[0]] == torch.float32
    for hook in hooks:
        hook.remove()
