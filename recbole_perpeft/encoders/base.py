"""What a frozen multimodal foundation model offers the item tower."""

from __future__ import annotations

import torch
from torch import nn


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
        mean = torch.tensor(self.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std).view(1, 3, 1, 1)
        return (pixels.float() / 255.0 - mean) / std

    def encode_text(self, input_ids, attention_mask) -> torch.Tensor:
        raise NotImplementedError

    def encode_image(self, pixel_values) -> torch.Tensor:
        raise NotImplementedError

    def peft_backbones(self, modalities) -> dict[str, nn.Module]:
        """The sub-modules a peft method is attached to, to adapt ``modalities``."""
        raise NotImplementedError

    def train(self, mode: bool = True):
        # The foundation is frozen: always in eval mode (no dropout, no batch-norm statistics
        # updates), so features computed once and cached equal the ones computed in a batch.
        return super().train(False)
