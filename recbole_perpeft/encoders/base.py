"""What a frozen multimodal foundation model offers the item tower."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


def select_layers(n_states: int, spec=None, stride: int = 2) -> list[int]:
    """Which of an encoder's ``n_states`` summary points a side network reads (config ``side_layers``).

    ``spec`` None: every ``stride``-th state counting back from the last one, which is always included
    (13 states of a 12-layer BERT, stride 2 -> [0, 2, ..., 12], IISAN's 7 blocks). ``spec`` a list of
    ints: those states (negative counts from the end), sorted, without duplicates."""
    if isinstance(n_states, bool) or not isinstance(n_states, int) or n_states < 1:
        raise ValueError(f"side_layers: the encoder must have at least one layer state, got n_states={n_states!r}.")
    if spec is None:
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"side_layers: the layer stride must be a positive int, got {stride!r}.")
        return list(range(n_states - 1, -1, -stride))[::-1]
    if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence) or len(spec) == 0:
        raise ValueError(f"side_layers must be a non-empty list of layer-state indices (or unset), got {spec!r}.")
    chosen = set()
    for index in spec:
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(f"side_layers: layer-state indices must be ints, got {index!r} in {list(spec)!r}.")
        if not -n_states <= index < n_states:
            raise ValueError(
                f"side_layers: index {index} is out of range for an encoder with {n_states} layer states "
                f"(valid: 0..{n_states - 1}, or -{n_states}..-1 from the end)."
            )
        chosen.add(index % n_states)
    return sorted(chosen)


class FoundationModel(nn.Module):
    """One or more frozen encoders, one vector per item and modality.

    Subclasses set ``modalities``, ``out_dims``, ``tokenizer``/``text_max_length`` (text),
    ``image_size``/``image_mean``/``image_std`` (image) and ``cache_ids`` (what identifies the weights
    and preprocessing of each modality, for on-disk caches), and implement the two encoders."""

    modalities: tuple[str, ...] = ("text", "image")

    def __init__(self):
        super().__init__()
        self.out_dims: dict[str, int] = {}
        self.cache_ids: dict[str, str] = {}

    def encode(self, modality: str, inputs: dict) -> torch.Tensor:
        if modality == "text":
            return self.encode_text(inputs["input_ids"].long(), inputs["attention_mask"].long())
        return self.encode_image(self.normalize(inputs["pixels"]))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, S, S] -> float normalised with the encoder's mean/std."""
        # On the pixels' device: a [1, 3, 1, 1] CPU tensor (not a scalar) does not combine with CUDA pixels.
        mean = torch.tensor(self.image_mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, device=pixels.device).view(1, 3, 1, 1)
        return (pixels.float() / 255.0 - mean) / std

    def encode_text(self, input_ids, attention_mask) -> torch.Tensor:
        raise NotImplementedError

    def encode_image(self, pixel_values) -> torch.Tensor:
        raise NotImplementedError

    # --- per-layer summaries (side networks) ----------------------------------------------------------

    def num_layer_states(self, modality: str) -> int:
        """How many summary points (e.g. embedding output + each layer) the ``modality`` encoder has."""
        return len(self.layer_widths(modality))

    def layer_widths(self, modality: str) -> list[int]:
        """The width of each summary point of the ``modality`` encoder, in order."""
        raise NotImplementedError

    def layer_states(self, modality: str, inputs: dict, layers: list[int]) -> list[torch.Tensor]:
        """One [N, width] summary per index in ``layers`` (0..num_layer_states-1) for a batch given
        as ``encode`` takes it; the last state's summary is what ``encode_text``/``encode_image``
        build on."""
        layers = self._check_layers(modality, layers)
        if modality == "text":
            return self.text_layer_states(inputs["input_ids"].long(), inputs["attention_mask"].long(), layers)
        return self.image_layer_states(self.normalize(inputs["pixels"]), layers)

    def text_layer_states(self, input_ids, attention_mask, layers: list[int]) -> list[torch.Tensor]:
        raise NotImplementedError

    def image_layer_states(self, pixel_values, layers: list[int]) -> list[torch.Tensor]:
        raise NotImplementedError

    def _check_layers(self, modality: str, layers) -> list[int]:
        n = self.num_layer_states(modality)
        layers = list(layers)
        bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n]
        if bad or not layers:
            raise ValueError(
                f"Layer-state indices for {modality} must be a non-empty list of ints in 0..{n - 1}, got {layers!r}."
            )
        return layers

    # --- the top text layers alone (adapt_layers) --------------------------------------------------------

    def text_layer_stack(self) -> tuple[nn.ModuleList, str]:
        """The text encoder's transformer layers in order, and the name of their list in module paths
        (peft's ``layers_pattern``): what ``adapt_layers: k`` puts the adapter on the top k of."""
        raise ValueError(
            f"adapt_layers: {type(self).__name__} cannot run its top text layers alone; set adapt_layers: ~."
        )

    def text_states_entering(self, input_ids, attention_mask, layer: int) -> torch.Tensor:
        """[N, T, width]: the token states entering text layer ``layer`` (0: the embeddings' output), as the
        full forward computes them."""
        raise NotImplementedError

    def encode_text_from(self, layer: int, hidden, input_ids, attention_mask) -> torch.Tensor:
        """``encode_text`` resumed at text layer ``layer``: ``hidden`` (the token states entering it) through
        that layer and the ones above, then ``encode_text``'s pooling (and projection)."""
        raise NotImplementedError

    def peft_backbones(self, modalities) -> dict[str, nn.Module]:
        """The sub-modules a peft method is attached to, to adapt ``modalities``."""
        raise NotImplementedError

    def train(self, mode: bool = True):
        """The frozen foundation stays in eval mode: its own dropout is off and batch-norm statistics
        stay fixed, so features computed once and cached equal the ones computed in a batch, and the
        pretrained model is used as it was trained to be used. The adapters peft injects into it
        (their dropout, e.g. ``lora_dropout``) follow ``mode``: that dropout is a training setting of
        the adapter, asked for in ``peft_config``."""
        super().train(False)
        if mode:
            for module in self.modules():
                if isinstance(module, BaseTunerLayer):
                    for name, child in module.named_children():
                        if name != "base_layer":
                            child.train(True)
        return self
