"""IISAN and CROSSAN side networks as modules: gates and mixing weights, MoMEF's top-k, placeholders."""

import pytest
import torch

from recbole_perpeft.adapters import get_adapter_family
from recbole_perpeft.adapters.crossan import CROSSAN, top_k_weights
from recbole_perpeft.adapters.iisan import IISAN
from recbole_perpeft.adapters.side_network import SideNetworkFamily, block_layers

# Cached-state widths as the real pair has them: MiniLM (4 states of 384) and EfficientNet stages.
WIDTHS = {"text": [12, 12, 12, 12], "image": [4, 6, 10, 20, 40]}
CONFIG = {"side_blocks": None, "side_adapter_size": 8, "side_width": None, "crossan_fusion": "momef", "momef_top_k": 2}


def batch(widths, n=6, seed=0, absent=()):
    gen = torch.Generator().manual_seed(seed)
    states = {m: [torch.randn(n, w, generator=gen) for w in ws] for m, ws in widths.items()}
    present = {m: torch.ones(n, dtype=torch.bool) for m in widths}
    for m, row in absent:
        present[m][row] = False
    return states, present


def nudge(module: torch.nn.Module, seed: int = 1) -> None:
    """Random values everywhere (adapters start as the identity, gates as uniform)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def test_block_layers_spread_each_modalitys_states_over_the_blocks():
    assert block_layers(4, 5) == [0, 1, 2, 2, 3]
    assert block_layers(5, 5) == [0, 1, 2, 3, 4]
    assert block_layers(7, 7) == list(range(7))
    assert block_layers(3, 1) == [2]


@pytest.mark.parametrize("name", ["iisan", "CROSSAN", "IISAN"])
def test_side_network_types_are_selected_by_peft_type(name):
    family = get_adapter_family(name)
    assert issubclass(family, SideNetworkFamily) and family.name == name.upper()
    assert not any(issubclass(get_adapter_family(other), SideNetworkFamily) for other in ("LORA", "moda", "FROZEN"))
    assert isinstance(family.network_class(WIDTHS, CONFIG), IISAN if name.upper() == "IISAN" else CROSSAN)


def test_defaults_come_from_the_familys_yaml_and_a_zero_is_not_a_default():
    net = IISAN(WIDTHS, {})  # every key from properties/adapter/IISAN.yaml
    assert (net.hidden, net.n_blocks, net.side_width) == (32, 5, 12)
    with pytest.raises(ValueError, match="side_adapter_size"):
        IISAN(WIDTHS, {**CONFIG, "side_adapter_size": 0})
    with pytest.raises(ValueError, match="momef_top_k"):
        CROSSAN(WIDTHS, {**CONFIG, "momef_top_k": 0})
    assert CROSSAN(WIDTHS, {**CONFIG, "momef_top_k": 5}).top_k == 2  # at most every expert


def test_iisan_outputs_intra_and_inter_parts_with_gates_in_range():
    net = IISAN(WIDTHS, CONFIG)
    nudge(net)
    assert net.n_blocks == 5  # the most states any modality has
    parts, per_modality = net(*batch(WIDTHS))
    assert set(parts) == {"intra_text", "intra_image", "inter"} and set(per_modality) == {"text", "image"}
    # Every block runs at the narrowest encoder's width (12); the image states are mapped to it.
    assert {k: v.shape[1] for k, v in parts.items()} == net.out_dims == {"intra_text": 12, "intra_image": 12,
                                                                        "inter": 12}
    for m in WIDTHS:
        g = net.intra_gate(m)
        assert g.shape == (5,) and ((g > 0) & (g < 1)).all()
    weights = net.inter_weights()
    assert weights.shape == (5, 2) and (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(5))


def test_iisan_with_one_modality_has_no_inter_network():
    net = IISAN({"text": [12, 12, 12]}, CONFIG)
    parts, _ = net(*batch({"text": [12, 12, 12]}))
    assert set(parts) == {"intra_text"} and net.inter is None


def test_missing_modality_rows_get_the_learned_placeholders():
    net = IISAN(WIDTHS, CONFIG)
    nudge(net)
    states, present = batch(WIDTHS, absent=[("image", 2)])
    other, _ = batch(WIDTHS, seed=5)
    states_b = {"text": states["text"], "image": other["image"]}  # different image states everywhere
    a, _ = net(states, present)
    b, _ = net(states_b, present)
    # Row 2 has no image: its output does not depend on the (zero / garbage) cached image states.
    torch.testing.assert_close(a["intra_image"][2], b["intra_image"][2])
    assert not torch.allclose(a["intra_image"][0], b["intra_image"][0])


def test_crossan_mixing_weights_sum_to_one_per_block():
    net = CROSSAN(WIDTHS, CONFIG)
    nudge(net)
    for m in WIDTHS:
        w = net.mix_weights(m)
        assert w.shape == (net.n_blocks, 3) and (w >= 0).all()  # two towers' outputs + own state
        torch.testing.assert_close(w.sum(-1), torch.ones(net.n_blocks))
    parts, per_modality = net(*batch(WIDTHS))
    assert set(parts) == {"fused"} and parts["fused"].shape == (6, 12) and set(per_modality) == {"text", "image"}


def test_crossan_towers_see_each_other():
    """Changing the image states changes the text tower's output (cross-modal gating)."""
    net = CROSSAN(WIDTHS, CONFIG)
    nudge(net)
    states, present = batch(WIDTHS)
    other, _ = batch(WIDTHS, seed=9)
    _, a = net(states, present)
    _, b = net({"text": states["text"], "image": other["image"]}, present)
    assert not torch.allclose(a["text"], b["text"])


@pytest.mark.parametrize("k", [1, 2, 3])
def test_momef_keeps_exactly_k_experts_per_item_with_weights_summing_to_one(k):
    logits = torch.randn(20, 3, generator=torch.Generator().manual_seed(k))
    w = top_k_weights(logits, k)
    assert ((w > 0).sum(-1) == k).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(20))
    # The kept experts are the k best, renormalised softmax weights of the full gate.
    full = torch.softmax(logits, -1)
    kept = torch.topk(logits, k, -1).indices
    expected = torch.zeros_like(full).scatter(-1, kept, full.gather(-1, kept))
    torch.testing.assert_close(w, expected / expected.sum(-1, keepdim=True))


def test_crossan_takes_any_number_of_modalities():
    widths = {"text": [8, 8], "image": [4, 16], "audio": [6, 6]}
    net = CROSSAN(widths, {**CONFIG, "momef_top_k": 2})
    nudge(net)
    states, present = batch(widths)
    weights = net.expert_weights({m: torch.randn(6, 6) for m in widths})
    assert ((weights > 0).sum(-1) == 2).all()
    parts, _ = net(states, present)
    assert parts["fused"].shape == (6, 6)


@pytest.mark.parametrize("fusion", ["concat", "static", "dynamic"])
def test_crossan_fusion_ablations(fusion):
    net = CROSSAN(WIDTHS, {**CONFIG, "crossan_fusion": fusion})
    nudge(net)
    parts, _ = net(*batch(WIDTHS))
    assert {k: v.shape[1] for k, v in parts.items()} == net.out_dims
    if fusion == "concat":
        assert set(parts) == {"tower_text", "tower_image"}
    else:
        outputs = {"text": torch.randn(6, 12), "image": torch.randn(6, 12)}
        weights = net.expert_weights(outputs)
        torch.testing.assert_close(weights.sum(-1), torch.ones(6))
        assert (weights > 0).all()  # static and dynamic keep every expert


def test_side_width_can_be_set():
    net = IISAN(WIDTHS, {**CONFIG, "side_width": 20})
    parts, _ = net(*batch(WIDTHS))
    assert {v.shape[1] for v in parts.values()} == {20}
    assert [type(m).__name__ for m in net.inputs["image"].maps] == ["Linear"] * 3 + ["Identity", "Linear"]


def test_unknown_fusion_is_refused():
    with pytest.raises(ValueError, match="crossan_fusion"):
        CROSSAN(WIDTHS, {**CONFIG, "crossan_fusion": "average"})


@pytest.mark.parametrize("cls", [IISAN, CROSSAN])
def test_every_gate_and_adapter_gets_a_gradient(cls):
    net = cls(WIDTHS, CONFIG)
    nudge(net)
    parts, _ = net(*batch(WIDTHS))
    sum(v.square().sum() for v in parts.values()).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # Placeholders get no gradient when every item has every modality.
    assert all("placeholders" in n for n in missing), missing
