"""LargeGlobalPEFT (PerPEFT paper §4.1.3): GlobalPEFT with one adapter and projector as large as
PerPEFT's all together: the adapter (its family's ``scaled`` hook: LoRA/MoDA's rank ``r`` with
``lora_alpha``, so LoRA's update scale ``lora_alpha / r`` stays the base model's; a side network's
``side_adapter_size``) and ``projector_hidden_size`` are multiplied by ``n_groups`` before the model
is built. Single-stage, like GlobalPEFT. Its own trainable parameter count and the PerPEFT-equivalent
estimate are logged side by side (``parameter_comparison``)."""

from __future__ import annotations

import copy
from logging import getLogger

from recbole_perpeft.adapters.registry import get_adapter_family, option, positive_int
from recbole_perpeft.model.sequential_recommender.globalpeft import GlobalPEFT


def projector_size(in_dims: dict, width: int, hidden: int, output_norm: bool = False) -> int:
    """Parameters of ItemTower's projector: per-modality LayerNorms, Linear(sum(in), width), Linear(width, hidden)
    and, with ``projector_output_norm``, a LayerNorm(hidden)."""
    total_in = sum(in_dims.values())
    return 2 * total_in + (total_in + 1) * width + (width + 1) * hidden + (2 * hidden if output_norm else 0)


def scaled_config(config, factor: int):
    """A copy of ``config`` with the adapter and the projector width ``factor`` times larger, and what
    was scaled ({key: (base, scaled)})."""
    updates, scaled = get_adapter_family(config["peft_type"]).scaled(config, factor)
    width = option(config, "projector_hidden_size", config["hidden_size"])
    scaled["projector_hidden_size"] = (width, width * factor)
    updates["projector_hidden_size"] = width * factor
    staged = copy.copy(config)
    staged.final_config_dict = dict(config.final_config_dict, **updates)
    # As if the user had asked for them: adapter families rank a user's keys over their own defaults.
    staged.external_config_dict = dict(config.external_config_dict, **updates)
    return staged, scaled


class LargeGlobalPEFT(GlobalPEFT):
    def __init__(self, config, dataset):
        factor = positive_int(option(config, "n_groups", 8), "n_groups (LargeGlobalPEFT's scale factor)")
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
        base_adapter = tower.family.base_parameter_count(config, groups)
        in_dims = {part: norm.normalized_shape[0] for part, norm in tower.projector["norms"].items()}
        base_projector = projector_size(in_dims, self.scaled["projector_hidden_size"][0], config["hidden_size"],
                                        bool(option(config, "projector_output_norm", False)))  # fmt: skip
        return {"own": own, "perpeft_equivalent": shared + groups * (base_adapter + base_projector)}
