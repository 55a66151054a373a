"""Global PEFT (paper §3.1): one PEFT module for all users.

item vector = ID embedding + projector([modality vectors of the PEFT-attached foundation model, or
a side network's outputs]); SASRec over the sequence; binary cross-entropy with one sampled negative
at every position (Eq. 1), or (``loss_type: INBATCH``) IISAN/CROSSAN's in-batch cross-entropy with
popularity correction. ``cmsa_weight`` > 0 adds SDA's cross-modal alignment loss on the batch's items."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType
from torch import nn
from tqdm import tqdm

from recbole_perpeft.data.dataloader import NEG_LIST, TARGET_LIST
from recbole_perpeft.model.item_tower import ItemTower
from recbole_perpeft.model.losses import CrossModalAlignment, inbatch_popularity_ce, item_log_popularity
from recbole_perpeft.model.sequence_encoder import SASRecEncoder

FOUNDATION_PREFIX = "item_tower.foundation."
LOSS_TYPES = ("BCE", "INBATCH")


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
        self.loss_type = str(config["loss_type"] or "BCE").upper()
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"{type(self).__name__}: loss_type must be one of {', '.join(LOSS_TYPES)}, got "
                             f"{config['loss_type']!r} (BCE: Eq. 1 with a sampled negative; INBATCH: in-batch "
                             "cross-entropy with popularity correction).")
        if self.loss_type == "INBATCH":
            counts = torch.bincount(dataset.inter_feat[self.ITEM_ID], minlength=self.n_items).float()
            log_pop = item_log_popularity(counts) if config["popularity_correction"] else torch.zeros(self.n_items)
            self.register_buffer("log_popularity", log_pop, persistent=False)
        self.cmsa_weight = float(config["cmsa_weight"] or 0.0)
        self.alignment = self._build_alignment(config) if self.cmsa_weight > 0 else None

    def _build_alignment(self, config) -> CrossModalAlignment:
        tower = self.item_tower
        if len(tower.modalities) != 2:
            raise ValueError(f"cmsa_weight > 0 aligns two modalities; this run has {tower.modalities}. "
                             "Give the items titles and images (image_dir), or set cmsa_weight: 0.")
        widths = tower.foundation.out_dims if tower.side is None else tower.side.width
        return CrossModalAlignment(
            {m: widths[m] for m in tower.modalities},
            align_dim=config["cmsa_dim"] or 64,
            temperature=config["cmsa_temperature"] or 0.07,
            variant=config["cmsa_variant"] or "cmsa",
        )

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

    def item_vectors_and_alignment(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
        """Item vectors of distinct ``items``, and the cross-modal alignment loss over those that have
        both modalities (0 when cmsa_weight is 0)."""
        parts, per_modality = self.item_tower.encode(items)
        vectors = self.item_id_embedding(items) + self.item_tower.project(parts)
        if self.alignment is None:
            return vectors, 0.0
        both = self.item_tower.present(items)
        return vectors, self.alignment({m: v[both] for m, v in per_modality.items()})

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
        vectors, alignment = self.item_vectors_and_alignment(items)
        emb = vectors[inverse]  # [3, B, L, H]
        output = self.encode_sequences(emb[0], seq)
        return self.recommendation_loss(output, emb[1], emb[2], pos, items, vectors) + self.cmsa_weight * alignment

    def recommendation_loss(self, output, pos_emb, neg_emb, pos, items, vectors) -> torch.Tensor:
        """``loss_type`` at every position with a target (``pos`` > 0): ``output`` the encoder's states,
        ``pos_emb``/``neg_emb`` the target's and the sampled negative's vectors, ``items``/``vectors``
        the batch's distinct items (the in-batch candidates)."""
        mask = pos > 0
        if self.loss_type == "INBATCH":
            real = items > 0  # padding (id 0) is no candidate
            return inbatch_popularity_ce(output[mask], pos[mask], vectors[real], items[real], self.log_popularity)
        pos_logits = (output * pos_emb).sum(-1)
        neg_logits = (output * neg_emb).sum(-1)
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
        tower = self.item_tower
        return {
            # peft: only the adapter's parameters of the foundation are trainable
            "peft_adapter" if tower.side is None else "side_network": tower.adapter_module(),
            "projector": tower.projector,
            "missing_modality_placeholders": tower.placeholders,
            "item_id_embedding": self.item_id_embedding,
            "sequence_encoder": self.sequence_encoder,
            "cmsa_heads": self.alignment or 0,
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
