"""CLIP (any id or local path) through transformers' CLIPModel: item vector = [image ‖ text]."""

from __future__ import annotations

import json
import os

from transformers import CLIPModel, CLIPTokenizer

from recbole_perpeft.encoders.base import FoundationModel

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def load_clip(path: str):
    try:
        model = CLIPModel.from_pretrained(path)
        tokenizer = CLIPTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise OSError(
            f"Could not load the CLIP model '{path}': no network access to the model hub and no local "
            f"copy was found ({type(err).__name__}: {str(err).splitlines()[0]}). Download it where the hub "
            "is reachable (e.g. `huggingface-cli download openai/clip-vit-base-patch32 --local-dir DIR`) "
            "and point --clip_path=DIR at that directory."
        ) from err
    return model, tokenizer


def image_preprocessing(path: str, default_size: int) -> tuple[int, tuple, tuple]:
    """Size/mean/std from the checkpoint's preprocessor_config.json when it has one."""
    size, mean, std = default_size, OPENAI_MEAN, OPENAI_STD
    config_file = os.path.join(path, "preprocessor_config.json")
    if os.path.isfile(config_file):
        with open(config_file) as f:
            cfg = json.load(f)
        crop = cfg.get("crop_size", size)
        size = crop.get("height", size) if isinstance(crop, dict) else crop
        mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
    return size, mean, std


class ClipFoundation(FoundationModel):
    modalities = ("image", "text")  # the paper's item vector: [image_embeds ‖ text_embeds]

    def __init__(self, config):
        super().__init__()
        path = config["clip_path"]
        self.clip, self.tokenizer = load_clip(path)
        self.clip.requires_grad_(False)
        self.text_max_length = min(config["text_max_length"] or 77, 77)  # CLIP's text window
        self.image_size, self.image_mean, self.image_std = image_preprocessing(
            path, self.clip.config.vision_config.image_size
        )
        dim = self.clip.config.projection_dim
        self.out_dims = {"text": dim, "image": dim}
        self.cache_ids = {
            "text": f"clip:{os.path.abspath(path) if os.path.isdir(path) else path}:text:{self.text_max_length}",
            "image": f"clip:{os.path.abspath(path) if os.path.isdir(path) else path}:image:{self.image_size}",
        }

    def encode_text(self, input_ids, attention_mask):
        out = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask)
        return self.clip.text_projection(out.pooler_output)

    def encode_image(self, pixel_values):
        out = self.clip.vision_model(pixel_values=pixel_values)
        return self.clip.visual_projection(out.pooler_output)

    def peft_backbones(self, modalities):
        # Adapt only the towers that are encoded per batch: a LoRA on a tower whose features are
        # cached would count as trainable and never train.
        if set(modalities) >= {"text", "image"}:
            return {"clip": self.clip}
        towers = {"text": self.clip.text_model, "image": self.clip.vision_model}
        return {m: towers[m] for m in modalities}
