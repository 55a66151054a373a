"""What the side networks (IISAN, CROSSAN) share: bottleneck adapter blocks and the inputs they read.

A side network never runs the foundation model: it reads each modality's per-layer summary vectors,
computed once and cached on disk (``recbole_perpeft.encoders.hidden_states``), so no gradient can
reach the foundation and an epoch costs about as much as the recommender itself. Which layers are
read is the LayerDrop setting (``side_layers``; by default every other hidden state)."""

from __future__ import annotations

import torch
from torch import nn

SIDE_PEFT_TYPES = ("IISAN", "CROSSAN")


def is_side_network(peft_type) -> bool:
    return str(peft_type).upper() in SIDE_PEFT_TYPES


class Bottleneck(nn.Module):
    """Houlsby-style adapter: x + up(act(down(x))). ``up`` starts at zero, so every block starts as
    the identity and training moves away from the frozen states gradually."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.down = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


def block_layers(n_states: int, n_blocks: int) -> list[int]:
    """Which of a modality's selected states each block reads: spread evenly from the first to the
    last, so modalities with different depths (MiniLM: 4 states, EfficientNet: 5) line up."""
    if n_blocks == 1:
        return [n_states - 1]
    return [round(i * (n_states - 1) / (n_blocks - 1)) for i in range(n_blocks)]


class SideInputs(nn.Module):
    """One modality's cached states, as the side network's blocks read them: block i gets the state
    ``block_layers[i]`` at the side network's ``width`` (a Linear maps states of another width, e.g.
    EfficientNet's 32..1280-channel stages). Items without the modality get a learned placeholder per
    block instead of the zeros in the cache."""

    def __init__(self, widths: list[int], n_blocks: int, width: int):
        super().__init__()
        self.width = width
        self.block_layers = block_layers(len(widths), n_blocks)
        self.maps = nn.ModuleList(
            nn.Identity() if widths[k] == self.width else nn.Linear(widths[k], self.width) for k in self.block_layers
        )
        self.placeholders = nn.Parameter(torch.randn(n_blocks, self.width) * 0.02)

    def forward(self, states: list[torch.Tensor], present: torch.Tensor) -> list[torch.Tensor]:
        keep = present.unsqueeze(1)
        return [
            torch.where(keep, project(states[k]), self.placeholders[i])
            for i, (k, project) in enumerate(zip(self.block_layers, self.maps, strict=True))
        ]


class SideNetwork(nn.Module):
    """Base of the side networks. ``widths``: per modality, the widths of its selected cached states.

    Every block runs at one width, ``side_width`` (default: the narrowest encoder's output width,
    e.g. MiniLM's 384 beside EfficientNet's 1280; BERT/ViT/CLIP-B pairs share 768 or 512), so
    modalities mix without extra maps, as in the papers, whose encoders have equal widths. Each
    state is mapped to it straight from its cached width, once per block.

    ``forward(states, present)`` takes per modality the list of cached states of a batch of items and
    whether each item has the modality; it returns ``(parts, per_modality)``: the named vectors that
    the item tower's projector concatenates (widths in ``out_dims``), and one vector per modality
    (for auxiliary losses such as CMSA)."""

    def __init__(self, widths: dict[str, list[int]], config):
        super().__init__()
        self.modalities = list(widths)
        self.n_blocks = config["side_blocks"] or max(len(w) for w in widths.values())
        self.hidden = config["side_adapter_size"] or 32
        self.side_width = config["side_width"] or min(w[-1] for w in widths.values())
        self.inputs = nn.ModuleDict({m: SideInputs(w, self.n_blocks, self.side_width) for m, w in widths.items()})
        self.width = {m: self.side_width for m in self.modalities}  # per modality, for auxiliary losses
        self.out_dims: dict[str, int] = {}

    def block_inputs(self, states: dict, present: dict) -> dict[str, list[torch.Tensor]]:
        return {m: self.inputs[m](states[m], present[m]) for m in self.modalities}


def build_side_network(peft_type: str, widths: dict[str, list[int]], config) -> SideNetwork:
    key = str(peft_type).upper()
    if key == "IISAN":
        from recbole_perpeft.adapters.iisan import IISAN

        return IISAN(widths, config)
    if key == "CROSSAN":
        from recbole_perpeft.adapters.crossan import CROSSAN

        return CROSSAN(widths, config)
    raise ValueError(f"peft_type '{peft_type}' is not a side network; choose one of {', '.join(SIDE_PEFT_TYPES)}.")
