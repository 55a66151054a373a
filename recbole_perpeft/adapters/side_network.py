"""What the side networks (IISAN, CROSSAN) share: bottleneck adapter blocks, the inputs they read, and
their adapter family (:class:`SideNetworkFamily`).

A side network never runs the foundation model: it reads each modality's per-layer summary vectors,
computed once and cached on disk (``recbole_perpeft.encoders.hidden_states``), so no gradient can
reach the foundation and an epoch costs about as much as the recommender itself. Which layers are
read is the LayerDrop setting (``side_layers``; by default every other hidden state). The keys and
their defaults: ``properties/adapter/IISAN.yaml`` / ``CROSSAN.yaml``."""

from __future__ import annotations

import torch
from torch import nn

from recbole_perpeft.adapters.base import ModuleFamily
from recbole_perpeft.adapters.registry import family_settings, positive_int
from recbole_perpeft.encoders.hidden_states import load_layer_states, select_layers


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

    family = ""  # the adapter family whose YAML holds this network's defaults (set by subclasses)

    def __init__(self, widths: dict[str, list[int]], config):
        super().__init__()
        self.modalities = list(widths)
        self.settings = settings = family_settings(self.family, config)
        # ~ derives a size from the encoders; a 0 is refused (positive_int), never taken for ~.
        if settings["side_blocks"] is None:
            settings["side_blocks"] = max(len(w) for w in widths.values())
        if settings["side_width"] is None:
            settings["side_width"] = min(w[-1] for w in widths.values())
        self.n_blocks = positive_int(settings["side_blocks"], "side_blocks")
        self.hidden = positive_int(settings["side_adapter_size"], "side_adapter_size")
        self.side_width = positive_int(settings["side_width"], "side_width")
        self.inputs = nn.ModuleDict({m: SideInputs(w, self.n_blocks, self.block_width(w)) for m, w in widths.items()})
        self.width = {m: self.inputs[m].width for m in self.modalities}  # per modality, for auxiliary losses
        self.out_dims: dict[str, int] = {}

    def block_width(self, widths: list[int]) -> int:
        """The width a modality's blocks run at, given the widths of its selected states."""
        return self.side_width

    def block_inputs(self, states: dict, present: dict) -> dict[str, list[torch.Tensor]]:
        return {m: self.inputs[m](states[m], present[m]) for m in self.modalities}


class SideNetworkFamily(ModuleFamily):
    """A side network (``network_class``) over each modality's cached per-layer states."""

    network_class: type[SideNetwork]

    def __init__(self, config, tower, store):
        settings = self.settings(config)
        self.layer_states = {m: self._layer_states(tower, store, m, settings) for m in tower.modalities}
        widths = {m: states.widths for m, states in self.layer_states.items()}
        super().__init__(config, tower, store, self.network_class(widths, config))
        self.out_dims = dict(self.network.out_dims)
        self.modality_dims = dict(self.network.width)

    @staticmethod
    def _layer_states(tower, store, modality: str, settings: dict):
        """The modality's selected per-layer states for every item, from the on-disk cache (built once,
        with a progress bar). ``side_layers``: None (every ``side_layer_stride``-th hidden state, the last
        included), a list of hidden-state indices, or such a list per modality."""
        spec = settings["side_layers"]
        layers = select_layers(
            tower.foundation.num_layer_states(modality),
            spec.get(modality) if isinstance(spec, dict) else spec,
            settings["side_layer_stride"],
        )
        return load_layer_states(
            store, tower.foundation, modality, layers,
            encode_inputs=lambda items: tower.item_inputs(modality, items),
            present=tower.has(modality),
            batch_size=tower.encode_batch_size,
            show_progress=tower.show_progress,
        )  # fmt: skip

    def encode(self, items: torch.Tensor) -> tuple[dict, dict]:
        states = {m: self.layer_states[m].gather(items) for m in self.tower.modalities}
        return self.active_network(states, {m: self.tower.has(m)[items] for m in self.tower.modalities})

    @classmethod
    def scaled(cls, config, factor: int) -> tuple[dict, dict]:
        """The bottleneck width of every adapter block, ``side_adapter_size``, times ``factor``."""
        size = positive_int(cls.settings(config)["side_adapter_size"], "side_adapter_size")
        return {"side_adapter_size": size * factor}, {"side_adapter_size": (size, size * factor)}

    def base_parameter_count(self, base_config, factor: int) -> int:
        """Exact: a base-size network built and counted (its size is not linear in the bottleneck)."""
        widths = {m: states.widths for m, states in self.layer_states.items()}
        return sum(p.numel() for p in self.network_class(widths, base_config).parameters())
