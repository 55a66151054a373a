"""LargeGlobalPEFT (PerPEFT paper §4.1.3): GlobalPEFT with one adapter and projector as large as
PerPEFT's all together: the LoRA rank ``r`` (``peft_defaults``/``peft_config``; a side network's
``side_adapter_size``) and ``projector_hidden_size`` are multiplied by ``n_groups`` before the model
is built. ``lora_alpha``
is scaled with ``r`` (LoRA's update scale ``lora_alpha / r`` stays the base model's). Single-stage,
like GlobalPEFT. Its own trainable parameter count and the PerPEFT-equivalent estimate are logged
side by side (``parameter_comparison``)."""

from __future__ import annotations

import copy
from logging import getLogger

from recbole_perpeft.adapters.side_network import build_side_network, is_side_network
from recbole_perpeft.model.sequential_recommender.globalpeft import GlobalPEFT


def projector_size(in_dims: dict, width: int, hidden: int) -> int:
    """Parameters of ItemTower's projector: per-modality LayerNorms, Linear(sum(in), width), Linear(width, hidden)."""
    total_in = sum(in_dims.values())
    return 2 * total_in + (total_in + 1) * width + (width + 1) * hidden


def scaled_config(config, factor: int):
    """A copy of ``config`` with the adapter rank (and alpha) and the projector width times ``factor``,
    and what was scaled ({key: (base, scaled)})."""
    cfg = config.final_config_dict
    peft_type = str(cfg.get("peft_type") or "").upper()
    peft = dict((cfg.get("peft_defaults") or {}).get(peft_type) or {})
    peft.update(cfg.get("peft_config") or {})
    scaled = {}
    if is_side_network(peft_type):  # a side network: its bottleneck width
        size = cfg.get("side_adapter_size") or 32
        scaled["side_adapter_size"] = (size, size * factor)
    elif peft_type and "r" in peft:
        scaled["r"] = (peft["r"], peft["r"] * factor)
        if "lora_alpha" in peft:
            scaled["lora_alpha"] = (peft["lora_alpha"], peft["lora_alpha"] * factor)
        peft.update({key: new for key, (_, new) in scaled.items()})
    elif peft_type:
        getLogger().warning(f"LargeGlobalPEFT: peft_type {peft_type} has no rank r; only the projector is scaled.")
    width = cfg.get("projector_hidden_size") or cfg["hidden_size"]
    scaled["projector_hidden_size"] = (width, width * factor)
    staged = copy.copy(config)
    top_level = {key: new for key, (_, new) in scaled.items() if key in ("projector_hidden_size", "side_adapter_size")}
    staged.final_config_dict = dict(cfg, **top_level)
    if peft_type:
        staged.final_config_dict["peft_config"] = peft
    return staged, scaled


class LargeGlobalPEFT(GlobalPEFT):
    def __init__(self, config, dataset):
        factor = int(config["n_groups"] or 8)
        if factor < 1:
            raise ValueError(f"LargeGlobalPEFT scales by n_groups, which must be >= 1 (got {factor}).")
        large_config, self_scaled = scaled_config(config, factor)
        super().__init__(large_config, dataset)
        self.scale_factor = factor
        self.scaled = self_scaled  # {key: (base, scaled)}
        self.parameter_comparison = self._compare_with_perpeft(config)
        getLogger().info(
            f"LargeGlobalPEFT: scaled by n_groups={factor}: "
            + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in self.scaled.items())
            + f"; trainable parameters {self.parameter_comparison['own']} "
            f"vs. PerPEFT with {factor} groups (estimate) {self.parameter_comparison['perpeft_equivalent']}"
        )

    def _compare_with_perpeft(self, config) -> dict:
        """Own trainable parameters and an estimate of PerPEFT's on the base config: ``n_groups``
        base-size adapters and projectors, plus the shared ID embeddings, SASRec and placeholders."""
        tower, groups = self.item_tower, self.scale_factor
        own = sum(p.numel() for p in self.parameters() if p.requires_grad)
        own_adapter = sum(p.numel() for p in tower.adapter_module().parameters() if p.requires_grad)
        own_projector = sum(p.numel() for p in tower.projector.parameters())
        shared = own - own_adapter - own_projector
        if tower.side is not None:  # count a base-size side network exactly
            widths = {m: states.widths for m, states in tower.layer_states.items()}
            base = build_side_network(config["peft_type"], widths, config)
            base_adapter = sum(p.numel() for p in base.parameters())
        else:
            base_adapter = own_adapter // groups if "r" in self.scaled else own_adapter  # LoRA: linear in r
        in_dims = {part: norm.normalized_shape[0] for part, norm in tower.projector["norms"].items()}
        base_projector = projector_size(in_dims, self.scaled["projector_hidden_size"][0], config["hidden_size"])
        return {"own": own, "perpeft_equivalent": shared + groups * (base_adapter + base_projector)}
