"""Global PEFT (paper §3.1): one PEFT module for all users.

item vector = ID embedding + projector([modality vectors of the PEFT-attached foundation model]);
SASRec over the sequence; binary cross-entropy with one sampled negative at every position (Eq. 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType
from torch import nn
from tqdm import tqdm

from recbole_perpeft.data.dataloader import NEG_LIST, TARGET_LIST
from recbole_perpeft.model.item_tower import ItemTower
from recbole_perpeft.model.sequence_encoder import SASRecEncoder

FOUNDATION_PREFIX = "item_tower.foundation."


class GlobalPEFT(SequentialRecommender):
    input_type = InputType.POINTWISE
    one_sequence_per_user = True  # trained on UserSequenceDataLoader batches
    adapt_foundation = True

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.initializer_range = config["initializer_range"]
        self.show_progress = bool(config["show_progress"])
        self.item_id_embedding = nn.Embedding(self.n_items, config["hidden_size"], padding_idx=0)
        self.sequence_encoder = SASRecEncoder(config, self.max_seq_length)
        for module in (self.item_id_embedding, self.sequence_encoder):
            module.apply(self._init_weights)
        with torch.no_grad():
            self.item_id_embedding.weight[0].zero_()
        self.item_tower = ItemTower(config, dataset, adapt=self.adapt_foundation)
        self._item_table = None

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    # --- item vectors --------------------------------------------------------------------------------

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        return self.item_id_embedding(items) + self.item_tower(items)

    def item_table(self) -> torch.Tensor:
        """Every item's vector, computed once per evaluation (batched, no grad) and reused until
        the model goes back to training."""
        if self._item_table is None or self.training:
            items = torch.arange(self.n_items, device=self.item_id_embedding.weight.device)
            chunks = items.split(self.item_tower.encode_batch_size)
            with torch.no_grad():
                rows = [
                    self.item_vectors(chunk)
                    for chunk in tqdm(chunks, desc="Item table", disable=not self.show_progress, leave=False)
                ]
            self._item_table = torch.cat(rows)
        return self._item_table

    def train(self, mode: bool = True):
        self._item_table = None  # parameters are about to change
        return super().train(mode)

    # --- sequence model --------------------------------------------------------------------------------

    def encode_sequences(self, item_emb: torch.Tensor, item_seq: torch.Tensor) -> torch.Tensor:
        return self.sequence_encoder(item_emb, self.get_attention_mask(item_seq))

    def forward(self, item_seq, item_seq_len, table=None):
        """User vector: the sequence encoder's output at each user's last position."""
        table = self.item_table() if table is None else table
        output = self.encode_sequences(table[item_seq], item_seq)
        return self.gather_indexes(output, item_seq_len - 1)

    def calculate_loss(self, interaction):
        seq, pos, neg = interaction[self.ITEM_SEQ], interaction[TARGET_LIST], interaction[NEG_LIST]
        # Each distinct item of the batch goes through the foundation model once.
        items, inverse = torch.unique(torch.stack([seq, pos, neg]), return_inverse=True)
        emb = self.item_vectors(items)[inverse]  # [3, B, L, H]
        output = self.encode_sequences(emb[0], seq)
        pos_logits = (output * emb[1]).sum(-1)
        neg_logits = (output * emb[2]).sum(-1)
        mask = pos > 0
        # Eq. 1: -log σ(pos) - log(1 - σ(neg)) at every real position.
        return (F.softplus(-pos_logits) + F.softplus(neg_logits))[mask].mean()

    def predict(self, interaction):
        user = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return (user * self.item_table()[interaction[self.ITEM_ID]]).sum(-1)

    def full_sort_predict(self, interaction):
        table = self.item_table()
        user = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], table)
        return user @ table.T

    # --- accounting and checkpoints --------------------------------------------------------------------

    def parameter_components(self) -> dict:
        return {
            "peft_adapter": self.item_tower.foundation,  # only the adapter's parameters are trainable
            "projector": self.item_tower.projector,
            "missing_modality_placeholders": self.item_tower.placeholders,
            "item_id_embedding": self.item_id_embedding,
            "sequence_encoder": self.sequence_encoder,
        }

    def foundation_parameter_count(self) -> int:
        tower = self.item_tower
        return sum(p.numel() for n, p in tower.foundation.named_parameters() if not tower.is_adapter_key(n))

    def _is_frozen_foundation_key(self, key: str, trainable: set) -> bool:
        if not key.startswith(FOUNDATION_PREFIX) or key in trainable:
            return False
        return not self.item_tower.is_adapter_key(key)  # adapters are kept even while frozen

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        """Without the frozen foundation weights: they are reloaded from their source, and
        checkpoints stay the size of what was trained."""
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        for key in [k for k in state if self._is_frozen_foundation_key(k[len(prefix):], trainable)]:
            del state[key]
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        missing = [k for k in result.missing_keys if not self._is_frozen_foundation_key(k, trainable)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"Checkpoint does not match {type(self).__name__}: missing {missing}, "
                f"unexpected {result.unexpected_keys}. Was it written with other peft/encoder settings?"
            )
        self._item_table = None
        return result
