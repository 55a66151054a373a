"""CLIP (any id or local path) through transformers' CLIPModel: item vector = [image ‖ text]."""

from __future__ import annotations

import json
import os

import torch
from transformers import CLIPModel, CLIPTokenizer
from transformers.masking_utils import create_causal_mask

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

    # --- per-layer summaries: L+1 hidden states (embeddings + each layer) ---------------------------------

    def _tower_config(self, modality: str):
        return self.clip.config.text_config if modality == "text" else self.clip.config.vision_config

    def layer_widths(self, modality):
        config = self._tower_config(modality)
        return [config.hidden_size] * (config.num_hidden_layers + 1)

    def eos_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Per row, the token CLIPTextModel pools (its pooler_output): the legacy argmax of the ids
        when the config's eos_token_id is 2 (before transformers PR #24773), else the first EOS token."""
        text_model = self.clip.text_model
        eos = getattr(text_model, "eos_token_id", self.clip.config.text_config.eos_token_id)
        ids = input_ids.to(torch.int)
        if eos == 2:
            return ids.argmax(dim=-1)
        return (ids == eos).int().argmax(dim=-1)

    def text_layer_states(self, input_ids, attention_mask, layers):
        """The EOS token of each hidden state (before final_layer_norm, which only the last one gets
        in CLIP: final_layer_norm(last summary) is the pooler_output)."""
        out = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        eos = self.eos_positions(input_ids).to(input_ids.device)
        return [out.hidden_states[i][rows, eos] for i in layers]

    def image_layer_states(self, pixel_values, layers):
        """The CLS token of each hidden state (post_layernorm(last summary) is the pooler_output)."""
        out = self.clip.vision_model(pixel_values=pixel_values, output_hidden_states=True)
        return [out.hidden_states[i][:, 0] for i in layers]

    # --- the top text layers alone (adapt_layers; the vision tower is refused by the peft family) --------

    def text_layer_stack(self):
        return self.clip.text_model.encoder.layers, "layers"

    def text_states_entering(self, input_ids, attention_mask, layer):
        out = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.hidden_states[layer]

    def encode_text_from(self, layer, hidden, input_ids, attention_mask):
        """CLIPTextTransformer's forward from encoder layer ``layer`` on (its causal + padding mask, the
        layers, final_layer_norm, the EOS token), then the text projection: ``encode_text``'s vector."""
        text_model = self.clip.text_model
        mask = create_causal_mask(config=text_model.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  cache=None)  # fmt: skip
        for block in text_model.encoder.layers[layer:]:
            hidden = block(hidden, mask, is_causal=True)
        hidden = text_model.final_layer_norm(hidden)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self.clip.text_projection(hidden[rows, self.eos_positions(input_ids).to(hidden.device)])

    def peft_backbones(self, modalities):
        # Adapt only the towers that are encoded per batch: a LoRA on a tower whose features are
        # cached would count as trainable and never train.
        if set(modalities) >= {"text", "image"}:
            return {"clip": self.clip}
        towers = {"text": self.clip.text_model, "image": self.clip.vision_model}
        return {m: towers[m] for m in modalities}
