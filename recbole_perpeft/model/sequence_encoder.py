"""SASRec's encoder over given item vectors, all positions out, in one of two variants (``sasrec_variant``).

``recbole`` (default): RecBole's post-LN SASRec (its ``TransformerEncoder``): LayerNorm and dropout on item +
position vectors, post-LN blocks, normal(0, initializer_range) weights.

``official``: the pre-LN SASRec of the official PerPEFT code (kswoo97/PerPEFT, after SASRec.pytorch): the item
vectors scaled by sqrt(hidden_size) plus a position vector (no input LayerNorm), then per block
``Q = LN(x); x = Q + MHA(Q, x, x)`` and ``x = LN(x); x = x + FFN(x)``, a final LayerNorm, xavier_normal
weights. Positions count from the sequence's END (the most recent item is always position L, padding 0), as
in the official right-aligned batches. The FFN width and activation are ``inner_size`` and ``hidden_act``
(official: 32 and relu), the LayerNorm eps ``layer_norm_eps`` (official: 1e-8). Hand-written because no
library ships this block (torch's ``TransformerEncoderLayer(norm_first=True)`` normalises the attention's
keys and values too and adds the residual to the unnormalised input); the attention is torch's
``nn.MultiheadAttention``. One difference stays: the official code lets real positions attend to the
padding in front of short sequences; here (left-aligned, as RecBole's lists) padding is masked out."""

from __future__ import annotations

import math

import torch
from recbole.model.layers import TransformerEncoder
from torch import nn
from transformers.activations import ACT2FN

from recbole_perpeft.config_values import choice, option

SASREC_VARIANTS = ("recbole", "official")


def sasrec_variant(config) -> str:
    value = option(config, "sasrec_variant", "recbole")
    return choice(str(value).lower(), SASREC_VARIANTS, "sasrec_variant", "(properties/model/GlobalPEFT.yaml)",
                  given=value)  # fmt: skip


class SASRecEncoder(nn.Module):
    def __init__(self, config, max_seq_length: int):
        super().__init__()
        hidden = config["hidden_size"]
        self.position_embedding = nn.Embedding(max_seq_length, hidden)
        self.trm_encoder = TransformerEncoder(
            n_layers=config["n_layers"],
            n_heads=config["n_heads"],
            hidden_size=hidden,
            inner_size=config["inner_size"],
            hidden_dropout_prob=config["hidden_dropout_prob"],
            attn_dropout_prob=config["attn_dropout_prob"],
            hidden_act=config["hidden_act"],
            layer_norm_eps=config["layer_norm_eps"],
        )
        self.LayerNorm = nn.LayerNorm(hidden, eps=config["layer_norm_eps"])
        self.dropout = nn.Dropout(config["hidden_dropout_prob"])

    def forward(self, item_emb: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, L, H] item vectors and RecBole's causal attention mask -> [B, L, H]."""
        positions = torch.arange(item_emb.size(1), device=item_emb.device)
        x = self.dropout(self.LayerNorm(item_emb + self.position_embedding(positions).unsqueeze(0)))
        return self.trm_encoder(x, attention_mask, output_all_encoded_layers=True)[-1]


class PreLNBlock(nn.Module):
    """One block of the official SASRec: attention over LN(x) as query, x as keys/values, then a
    position-wise FFN (Linear -> act -> dropout -> Linear -> dropout) with its residual on LN(x)."""

    def __init__(self, config):
        super().__init__()
        hidden, eps, dropout = config["hidden_size"], config["layer_norm_eps"], config["hidden_dropout_prob"]
        self.attention_norm = nn.LayerNorm(hidden, eps=eps)
        self.attention = nn.MultiheadAttention(hidden, config["n_heads"], dropout=config["attn_dropout_prob"],
                                               batch_first=True)  # fmt: skip
        self.ffn_norm = nn.LayerNorm(hidden, eps=eps)
        inner = config["inner_size"]
        self.ffn = nn.Sequential(nn.Linear(hidden, inner), ACT2FN[config["hidden_act"]], nn.Dropout(dropout),
                                 nn.Linear(inner, hidden), nn.Dropout(dropout))  # fmt: skip

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        query = self.attention_norm(x)
        x = query + self.attention(query, x, x, attn_mask=mask, need_weights=False)[0]
        x = self.ffn_norm(x)
        return x + self.ffn(x)


class OfficialSASRecEncoder(nn.Module):
    def __init__(self, config, max_seq_length: int):
        super().__init__()
        hidden = config["hidden_size"]
        self.scale = math.sqrt(hidden)
        self.n_heads = config["n_heads"]
        self.position_embedding = nn.Embedding(max_seq_length + 1, hidden, padding_idx=0)  # 0: padding
        self.dropout = nn.Dropout(config["hidden_dropout_prob"])
        self.blocks = nn.ModuleList(PreLNBlock(config) for _ in range(config["n_layers"]))
        self.final_norm = nn.LayerNorm(hidden, eps=config["layer_norm_eps"])

    def forward(self, item_emb: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, L, H] item vectors and RecBole's causal attention mask ([B, 1, L, L], 0 = may attend) -> [B, L, H]."""
        batch, length = item_emb.shape[:2]
        # The last query row of RecBole's mask may attend to every real key: which positions hold an item.
        real = attention_mask[:, 0, -1, :] >= 0
        n = real.sum(1, keepdim=True)
        positions = (torch.arange(length, device=item_emb.device) + length - n + 1) * real  # the last item: L
        x = self.dropout(item_emb * self.scale + self.position_embedding(positions))
        mask = attention_mask.to(x.dtype).expand(batch, self.n_heads, length, length)
        mask = mask.reshape(batch * self.n_heads, length, length)
        for block in self.blocks:
            x = block(x, mask)
        return self.final_norm(x)


def build_sequence_encoder(config, max_seq_length: int) -> nn.Module:
    """The ``sasrec_variant``'s encoder, initialised as that variant is (see the module docstring)."""
    if sasrec_variant(config) == "official":
        encoder = OfficialSASRecEncoder(config, max_seq_length)
    else:
        encoder = SASRecEncoder(config, max_seq_length)
    encoder.apply(weight_init(config))
    return encoder


def weight_init(config):
    """The variant's initialisation of a module (apply it with ``module.apply``), also for the item IDs."""
    if sasrec_variant(config) == "official":
        return xavier_init
    return lambda module: init_weights(module, config["initializer_range"])


def xavier_init(module: nn.Module) -> None:
    """The official code's: xavier_normal on every parameter of two or more dimensions (of this module
    itself; ``apply`` visits the rest), the others as torch builds them; an embedding's padding row 0."""
    for param in module.parameters(recurse=False):
        if param.dim() >= 2:
            nn.init.xavier_normal_(param.data)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        module.weight.data[module.padding_idx].zero_()


def init_weights(module: nn.Module, std: float) -> None:
    """SASRec's initialisation (RecBole's): normal(0, std) Linear/Embedding weights, zero biases,
    LayerNorm 1/0. Use as ``module.apply(lambda m: init_weights(m, std))``."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(mean=0.0, std=std)
    elif isinstance(module, nn.LayerNorm):
        module.bias.data.zero_()
        module.weight.data.fill_(1.0)
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.data.zero_()
