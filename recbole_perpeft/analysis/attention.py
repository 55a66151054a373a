"""Token attention of item titles under each adapter (paper Fig. 1, 6): the text encoder's last layer,
averaged over heads, read from the position whose state becomes the item's text vector.

What "the pooling position" is, per text encoder (:func:`pooling_weights`, :func:`pooling_description`):

- CLIP: the EOS token (``ClipFoundation.eos_positions``, what CLIPTextModel pools): its attention row.
- a BERT-like encoder with ``text_pooling: cls``: the [CLS] row.
- a BERT-like encoder with ``text_pooling: mean`` (all-MiniLM-L6-v2, the default): the text vector is the
  mean of the last layer's token states, and each token state is built by that token's row of the last
  layer's attention; so we use the mean of the last-layer attention rows of the real tokens, each row
  weighted as the pooling weights its state (1/n over the n non-padding tokens).

Every distribution covers the title's real tokens, special tokens included ([CLS]/[SEP], CLIP's start and
end tokens), and sums to one. The map differs between groups only where the adapter sits inside the text
encoder (LoRA, (IA)3, MoDA, any peft method): :func:`attention_note` says when it does not."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from recbole_perpeft.analysis.loading import activated, adapter_names

SPECIAL_LABELS = {"<|startoftext|>": "[SOS]", "<|endoftext|>": "[EOS]"}


@dataclass
class AttentionTable:
    """Pooled last-layer attention of ``items`` under each adapter."""

    items: np.ndarray  # [N] internal item ids
    item_tokens: list[str]  # [N] external item ids (align runs by these)
    input_ids: np.ndarray  # [N, T] title tokens, 0-padded past ``lengths``
    lengths: np.ndarray  # [N] real tokens per title
    adapters: list[str]  # ["global", "group 0", ...]
    weights: np.ndarray  # [A, N, T] float64, each row sums to one over its real tokens

    def row(self, item_token: str) -> int:
        index = self.item_tokens.index(str(item_token))
        return index

    def distributions(self, index: int) -> np.ndarray:
        """[A, length] of item ``index`` (position in ``items``)."""
        return self.weights[:, index, : self.lengths[index]]


def text_encoder(foundation):
    """The module whose forward takes ``input_ids``/``attention_mask`` and returns hidden states."""
    encoders = foundation.peft_backbones(["text"])
    if "text" in encoders:
        return encoders["text"]
    clip = getattr(foundation, "clip", None)  # CLIP with both towers adapted: peft_backbones gives the whole model
    if clip is not None:
        return clip.text_model
    raise ValueError(f"token attention: {type(foundation).__name__} has no text encoder to read.")


def pooling_description(foundation) -> str:
    if hasattr(foundation, "eos_positions"):
        return "CLIP text: the EOS token's attention row (the token CLIP pools)"
    if getattr(foundation, "pooling", None) == "cls":
        return "BERT-like text, cls pooling: the [CLS] token's attention row"
    return (
        "BERT-like text, mean pooling: the mean of the real tokens' attention rows, each weighted as the mean "
        "pooling weights its state (1/n over the n non-padding tokens)"
    )


def pooling_weights(foundation, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] how much each position's last-layer state counts in the text vector (rows sum to one)."""
    mask = attention_mask.float()
    if hasattr(foundation, "eos_positions"):
        positions = foundation.eos_positions(input_ids).to(input_ids.device)
        return torch.nn.functional.one_hot(positions, input_ids.shape[1]).float()
    if getattr(foundation, "pooling", None) == "cls":
        return torch.nn.functional.one_hot(torch.zeros_like(input_ids[:, 0]), input_ids.shape[1]).float()
    return mask / mask.sum(1, keepdim=True).clamp(min=1.0)


@contextmanager
def eager_attention(foundation):
    """transformers returns attention weights only from its eager implementation; switch every
    transformers model inside the foundation to it for the block, and back (sdpa and eager agree to
    float noise)."""
    switched = []
    for module in foundation.modules():
        if hasattr(module, "set_attn_implementation") and hasattr(module, "config"):
            switched.append((module, module.config._attn_implementation))
    for module, _ in switched:
        module.set_attn_implementation("eager")
    try:
        yield
    finally:
        for module, previous in switched:
            module.set_attn_implementation(previous)


@torch.no_grad()
def pooled_attention(foundation, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] last-layer attention (mean over heads) from the pooling position to every token."""
    input_ids, attention_mask = input_ids.long(), attention_mask.long()
    with eager_attention(foundation):
        out = text_encoder(foundation)(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True)
    if not out.attentions:
        raise RuntimeError(f"{type(text_encoder(foundation)).__name__} returned no attention weights.")
    last = out.attentions[-1].float().mean(1)  # [B, T(query), T(key)]
    rows = torch.einsum("bq,bqk->bk", pooling_weights(foundation, input_ids, attention_mask), last)
    rows = rows.double() * attention_mask  # padding keys are masked out already; exact zeros here
    return rows / rows.sum(1, keepdim=True)


def _set_text_condition(tower) -> None:
    """MoDA's gates mix experts by the modality being encoded: set it to text (no-op for other families)."""
    from recbole_perpeft.adapters.moda import MoDAFamily, set_condition

    if isinstance(tower.family, MoDAFamily) and tower.family.peft_models:
        set_condition(tower.foundation, tower.foundation.modalities.index("text"))


def attention_note(model) -> tuple[bool, str]:
    """(whether group adapters can change the text encoder's attention, a sentence saying why)."""
    tower = model.item_tower
    family = str(getattr(tower.family, "name", type(tower.family).__name__))
    if "text" not in tower.modalities:
        return False, "this run has no text modality: there is no title attention to show."
    if "text" in tower.adapted:
        return True, f"peft_type {family} sits inside the text encoder: each group's adapter changes its attention."
    where = "a side network beside the frozen text encoder" if tower.side is not None else "no adapter in it"
    return False, (
        f"peft_type {family} puts {where}: the encoder's attention is the same under every group "
        "(the groups differ in their side networks and projectors), so only the global map is shown."
    )


def title_items(model, items=None) -> torch.Tensor:
    """The items (internal ids) with a title, among ``items`` (default: all)."""
    tower = model.item_tower
    has = tower.has("text")
    candidates = torch.arange(len(has)) if items is None else torch.as_tensor(list(items), dtype=torch.long)
    return candidates[has[candidates].cpu()]


def adapter_attention(
    model, items, item_tokens: list[str], batch_size: int = 128, all_groups: bool | None = None
) -> AttentionTable:
    """Pooled attention of ``items`` (internal ids with titles) under the global adapter and, when
    ``all_groups`` (default: whenever groups can differ, :func:`attention_note`), every group's."""
    tower = model.item_tower
    items = torch.as_tensor(items, dtype=torch.long)
    if (~tower.has("text")[items]).any():
        raise ValueError("adapter_attention: some items have no title (select them with title_items).")
    device = tower.input_ids.device
    ids, mask = tower.input_ids[items.to(device)], tower.attention_mask[items.to(device)]
    width = max(int(mask.sum(1).max()), 1)
    ids, mask = ids[:, :width], mask[:, :width]
    differs = attention_note(model)[0] if all_groups is None else all_groups
    adapters = adapter_names(tower.n_groups if differs else 0)
    weights = np.zeros((len(adapters), len(items), width))
    for a, (_, group) in enumerate(adapters):
        with activated(tower, group):
            _set_text_condition(tower)
            for start in range(0, len(items), batch_size):
                chunk = slice(start, start + batch_size)
                weights[a, chunk] = pooled_attention(tower.foundation, ids[chunk], mask[chunk]).cpu().numpy()
    return AttentionTable(
        items=items.numpy(),
        item_tokens=[item_tokens[i] for i in items.tolist()],
        input_ids=ids.cpu().numpy(),
        lengths=mask.sum(1).cpu().numpy(),
        adapters=[name for name, _ in adapters],
        weights=weights,
    )


def token_labels(tokenizer, ids) -> list[str]:
    """Readable token strings: CLIP's '</w>' word ends dropped, its start/end tokens as [SOS]/[EOS]."""
    labels = []
    for token in tokenizer.convert_ids_to_tokens([int(i) for i in ids]):
        token = SPECIAL_LABELS.get(token, token)
        labels.append(token.replace("</w>", "") or token)
    return labels
