"""SASRec's encoder over given item vectors (RecBole's TransformerEncoder), all positions out."""

from __future__ import annotations

import torch
from recbole.model.layers import TransformerEncoder
from torch import nn


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
