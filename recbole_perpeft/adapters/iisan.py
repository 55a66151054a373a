"""IISAN (Fu et al., SIGIR'24): intra- and inter-modal side adapter networks over cached states.

Per modality, an intra-modal side network: h <- A_i(g_i * H_i + (1 - g_i) * h) with a learnable
gate g_i = sigmoid(w_i) between the frozen state H_i and the previous block's output. One
inter-modal network over all modalities: h <- A_i(h + sum_m g_i^m * H_i^m), the g_i^m a softmax over
modalities (for text and image exactly the paper's g_i and 1 - g_i). Its output, and each intra
output, go to the projector. Every network runs at ``side_width`` (see ``SideNetwork``).

``iisan_variant: original`` builds the official PerPEFT code's IISAN instead (:class:`OriginalIISAN`): each
intra-modal network at its own encoder's width (CLIP: text 512, image 768), the inter-modal one at the text
width with its own image->text Linear per block, adapters initialised normal(0, 1e-4). With CLIP and the
default LayerDrop (7 of 13 hidden states) that is the official 7 blocks, ~3.6 M parameters."""

from __future__ import annotations

from logging import getLogger

import torch
from torch import nn

from recbole_perpeft.adapters.registry import family_settings, register_adapter_family
from recbole_perpeft.adapters.side_network import Bottleneck, SideNetwork, SideNetworkFamily
from recbole_perpeft.config_values import choice


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


class OriginalIISAN(SideNetwork):
    """The official code's IISAN. Per modality m and block i: h_m <- A_i(w_i h_m + (1 - w_i) H_i^m), w_i a
    learned sigmoid weight of the previous output (block 0 reads H_0^m). Inter-modal, text as the anchor:
    h <- A_i(h + v_i H_i^text + (1 - v_i) P_i(H_i^image)), P_i a Linear from the image width to the text's.
    The projector gets [intra_text, intra_image, inter]."""

    family = "IISAN"

    def block_width(self, widths: list[int]) -> int:
        return widths[-1]  # the modality's own width (no map between its encoder and its side network)

    def __init__(self, widths: dict[str, list[int]], config):
        super().__init__(widths, config)
        n, hidden = self.n_blocks, self.hidden
        self.modalities = sorted(self.modalities, key=lambda m: m != "text")  # text first, as the official output
        self.intra = nn.ModuleDict(
            {m: nn.ModuleList(Bottleneck(self.width[m], hidden) for _ in range(n)) for m in self.modalities}
        )
        self.intra_gates = nn.ParameterDict({m: nn.Parameter(torch.zeros(n)) for m in self.modalities})
        self.out_dims = {f"intra_{m}": self.width[m] for m in self.modalities}
        self.inter = None
        if len(self.modalities) != 2:
            getLogger().info("IISAN (original): not two modalities, so no inter-modal side network.")
        else:
            anchor, other = self.modalities
            self.inter = nn.ModuleList(Bottleneck(self.width[anchor], hidden) for _ in range(n))
            self.inter_maps = nn.ModuleList(nn.Linear(self.width[other], self.width[anchor]) for _ in range(n))
            self.inter_gates = nn.Parameter(torch.zeros(n))
            self.out_dims["inter"] = self.width[anchor]
        for module in self.modules():
            if isinstance(module, Bottleneck):  # the official code's init: no block starts as the identity
                for param in (*module.down.parameters(), *module.up.parameters()):
                    nn.init.normal_(param, std=1e-4)

    def forward(self, states: dict, present: dict):
        inputs = self.block_inputs(states, present)
        parts, per_modality = {}, {}
        for m in self.modalities:
            keep, h = torch.sigmoid(self.intra_gates[m]), inputs[m][0]
            for i, adapter in enumerate(self.intra[m]):
                h = adapter(keep[i] * h + (1 - keep[i]) * inputs[m][i])
            parts[f"intra_{m}"] = per_modality[m] = h
        if self.inter is not None:
            anchor, other = self.modalities
            weight, h = torch.sigmoid(self.inter_gates), 0
            for i, adapter in enumerate(self.inter):
                mixed = weight[i] * inputs[anchor][i] + (1 - weight[i]) * self.inter_maps[i](inputs[other][i])
                h = adapter(h + mixed)
            parts["inter"] = h
        return parts, per_modality


IISAN_VARIANTS = {"ours": IISAN, "original": OriginalIISAN}


def iisan_network(widths: dict[str, list[int]], config) -> SideNetwork:
    """The ``iisan_variant``'s network (properties/adapter/IISAN.yaml)."""
    variant = family_settings("IISAN", config)["iisan_variant"]
    name = choice(str(variant).lower(), IISAN_VARIANTS, "iisan_variant", "(properties/adapter/IISAN.yaml)",
                  given=variant)  # fmt: skip
    return IISAN_VARIANTS[name](widths, config)


@register_adapter_family("IISAN")
class IISANFamily(SideNetworkFamily):
    network_class = staticmethod(iisan_network)
