"""IISAN (Fu et al., SIGIR'24): intra- and inter-modal side adapter networks over cached states.

Per modality, an intra-modal side network: h <- A_i(g_i * H_i + (1 - g_i) * h) with a learnable
gate g_i = sigmoid(w_i) between the frozen state H_i and the previous block's output. One
inter-modal network over all modalities: h <- A_i(h + sum_m g_i^m * H_i^m), the g_i^m a softmax over
modalities (for text and image exactly the paper's g_i and 1 - g_i). Its output, and each intra
output, go to the projector. Every network runs at ``side_width`` (see ``SideNetwork``)."""

from __future__ import annotations

from logging import getLogger

import torch
from torch import nn

from recbole_perpeft.adapters.registry import register_adapter_family
from recbole_perpeft.adapters.side_network import Bottleneck, SideNetwork, SideNetworkFamily


class IISAN(SideNetwork):
    family = "IISAN"

    def __init__(self, widths: dict[str, list[int]], config):
        super().__init__(widths, config)
        n = self.n_blocks
        self.intra = nn.ModuleDict(
            {m: nn.ModuleList(Bottleneck(self.side_width, self.hidden) for _ in range(n)) for m in self.modalities}
        )
        self.intra_gates = nn.ParameterDict({m: nn.Parameter(torch.zeros(n)) for m in self.modalities})
        self.out_dims = {f"intra_{m}": self.side_width for m in self.modalities}
        self.inter = None
        if len(self.modalities) < 2:
            getLogger().info("IISAN: one modality, so no inter-modal side network (intra-modal only).")
            return
        self.inter = nn.ModuleList(Bottleneck(self.side_width, self.hidden) for _ in range(n))
        self.inter_gates = nn.Parameter(torch.zeros(n, len(self.modalities)))
        self.out_dims["inter"] = self.side_width

    def intra_gate(self, modality: str) -> torch.Tensor:
        """[n_blocks] weights of the frozen state (1 - g: the previous block's output)."""
        return torch.sigmoid(self.intra_gates[modality])

    def inter_weights(self) -> torch.Tensor:
        """[n_blocks, n_modalities], rows summing to 1."""
        return torch.softmax(self.inter_gates, dim=-1)

    def forward(self, states: dict, present: dict):
        inputs = self.block_inputs(states, present)
        parts, per_modality = {}, {}
        for m in self.modalities:
            gates, h = self.intra_gate(m), inputs[m][0]
            for i, adapter in enumerate(self.intra[m]):
                h = adapter(gates[i] * inputs[m][i] + (1 - gates[i]) * h)
            parts[f"intra_{m}"] = per_modality[m] = h
        if self.inter is not None:
            weights = self.inter_weights()
            h = torch.zeros_like(inputs[self.modalities[0]][0])
            for i, adapter in enumerate(self.inter):
                h = adapter(h + sum(weights[i, j] * inputs[m][i] for j, m in enumerate(self.modalities)))
            parts["inter"] = h
        return parts, per_modality


@register_adapter_family("IISAN")
class IISANFamily(SideNetworkFamily):
    network_class = IISAN
