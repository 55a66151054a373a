"""CROSSAN (Fu et al. 2025): cross-modal side adapter towers, fused by a mixture of modality experts.

One side tower per modality (any number). At block i the input to modality t's adapter mixes the
previous outputs of every tower and t's own frozen state:

    x_i^t = sum_m alpha_i^{t,m} * h_{i-1}^m + alpha_i^{t,H} * H_i^t,   h_i^t = A_i^t(x_i^t)

with alpha_i^t a softmax over learnable logits (M + 1 weights per tower and block); every tower runs
at ``side_width`` (see ``SideNetwork``). The towers' outputs are fused (``crossan_fusion``):

- ``momef`` (the paper's MoMEF): every modality's output is an expert; a gating network scores the
  experts per item, the top ``momef_top_k`` are kept and their weights renormalised to sum to 1;
- ``dynamic``: the same gate, every expert kept; ``static``: one learned softmax weight per modality;
- ``concat``: no fusion, each tower's output goes to the projector (the paper's ablation)."""

from __future__ import annotations

import torch
from torch import nn

from recbole_perpeft.adapters.registry import register_adapter_family
from recbole_perpeft.adapters.side_network import Bottleneck, SideNetwork, SideNetworkFamily
from recbole_perpeft.config_values import choice

FUSIONS = ("momef", "dynamic", "static", "concat")


def top_k_weights(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Softmax over each row's k largest logits, zero elsewhere: rows sum to 1, exactly k non-zero."""
    kept = torch.topk(logits, k, dim=-1).indices
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, kept, True)
    return torch.softmax(logits.masked_fill(~mask, -torch.inf), dim=-1)


class CROSSAN(SideNetwork):
    family = "CROSSAN"

    def __init__(self, widths: dict[str, list[int]], config):
        super().__init__(widths, config)
        mods, n = self.modalities, self.n_blocks
        self.towers = nn.ModuleDict(
            {m: nn.ModuleList(Bottleneck(self.side_width, self.hidden) for _ in range(n)) for m in mods}
        )
        # logits[t][i]: weights of the M previous outputs, then of t's own frozen state.
        self.mix_logits = nn.ParameterDict({m: nn.Parameter(torch.zeros(n, len(mods) + 1)) for m in mods})
        self.fusion = choice(self.settings["crossan_fusion"], FUSIONS, "crossan_fusion")
        if self.fusion == "concat":
            self.out_dims = {f"tower_{m}": self.side_width for m in mods}
            return
        # At most every expert (a text-only run has one); dynamic and static keep them all.
        self.top_k = len(mods)
        if self.fusion == "momef":
            top_k = self.settings["momef_top_k"]
            if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
                raise ValueError(f"momef_top_k must be at least 1, got {top_k!r}.")
            self.top_k = min(top_k, len(mods))
        if self.fusion == "static":
            self.static_logits = nn.Parameter(torch.zeros(len(mods)))
        else:
            self.gate = nn.Linear(len(mods) * self.side_width, len(mods))
        self.out_dims = {"fused": self.side_width}

    def mix_weights(self, modality: str) -> torch.Tensor:
        """[n_blocks, M + 1]: weights of every tower's previous output, then of the own frozen state."""
        return torch.softmax(self.mix_logits[modality], dim=-1)

    def expert_weights(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, M] fusion weights per item (rows sum to 1)."""
        batch = next(iter(outputs.values())).shape[0]
        if self.fusion == "static":
            return torch.softmax(self.static_logits, dim=-1).expand(batch, -1)
        logits = self.gate(torch.cat([outputs[m] for m in self.modalities], dim=-1))
        return top_k_weights(logits, self.top_k)

    def forward(self, states: dict, present: dict):
        inputs = self.block_inputs(states, present)
        h = {m: inputs[m][0] for m in self.modalities}
        weights = {m: self.mix_weights(m) for m in self.modalities}
        for i in range(self.n_blocks):
            h = {
                t: self.towers[t][i](
                    sum(weights[t][i, j] * h[m] for j, m in enumerate(self.modalities))
                    + weights[t][i, -1] * inputs[t][i]
                )
                for t in self.modalities
            }
        if self.fusion == "concat":
            return {f"tower_{m}": h[m] for m in self.modalities}, h
        w = self.expert_weights(h)
        fused = sum(w[:, j : j + 1] * h[m] for j, m in enumerate(self.modalities))
        return {"fused": fused}, h


@register_adapter_family("CROSSAN")
class CROSSANFamily(SideNetworkFamily):
    network_class = CROSSAN
