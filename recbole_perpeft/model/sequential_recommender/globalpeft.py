"""Global PEFT (paper §3.1): one PEFT module for all users.

item vector = ID embedding + projector([modality vectors of the PEFT-attached foundation model, or
a side network's outputs]); a backbone recommender over them (``backbone``: SASRec over the sequence,
or LightGCN over the user-item graph, ``model/backbones``); binary cross-entropy with one sampled
negative per training position (Eq. 1), BPR, (``loss_type: INBATCH``) IISAN/CROSSAN's in-batch
cross-entropy with popularity correction, or (``SAMPLED_SOFTMAX``) a softmax cross-entropy over the
positive and negatives shared by the batch. ``cmsa_weight`` > 0 adds SDA's cross-modal alignment loss
on the batch's items. A model with ``has_item_tower = False`` (WithoutMM) has no multimodal part: the
item vector is the ID embedding, and nothing of the foundation model is built.

Item tables (every item's vector, for evaluation) are cached once per evaluation, keyed by group:
``None`` is the global adapter's; personalised subclasses (PerPEFT) add one per interest group."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType
from torch import nn
from tqdm import tqdm

from recbole_perpeft.adapters.registry import option
from recbole_perpeft.config_values import choice
from recbole_perpeft.data.dataloader import SAMPLED_SOFTMAX, SHARED_NEG_LOG_Q, SHARED_NEGATIVES
from recbole_perpeft.model.backbones import build_backbone, get_backbone
from recbole_perpeft.model.item_tower import ItemTower
from recbole_perpeft.model.losses import (
    CrossModalAlignment,
    inbatch_popularity_ce,
    item_log_popularity,
    sampled_softmax_ce,
)
from recbole_perpeft.model.sequence_encoder import init_weights, weight_init

FOUNDATION_PREFIX = "item_tower.foundation."
LOSS_TYPES = ("BCE", "BPR", "INBATCH", SAMPLED_SOFTMAX)


class SharedNegatives(NamedTuple):
    """The negatives a batch shares (loss_type SAMPLED_SOFTMAX), in the space users are scored in."""

    items: torch.Tensor  # [K] item ids
    vectors: torch.Tensor  # [K, H]
    log_q: torch.Tensor  # [K] log-probability that each is in the draw


class GlobalPEFT(SequentialRecommender):
    input_type = InputType.POINTWISE
    adapt_foundation = True
    has_item_tower = True  # False: ID embeddings only (WithoutMM); no foundation model, no cache

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        # Checked before anything is built (the item tower may load a foundation model and build caches).
        self.loss_type = choice(
            str(config["loss_type"]).upper(), LOSS_TYPES, f"{type(self).__name__}: loss_type",
            given=config["loss_type"],
            hint="(BCE: Eq. 1 with a sampled negative; BPR: the pairwise log-sigmoid; INBATCH: in-batch "
            "cross-entropy with popularity correction; SAMPLED_SOFTMAX: cross-entropy over the positive and "
            "sampled_softmax_negatives negatives shared by the batch)",
        )
        self.initializer_range = config["initializer_range"]
        self.show_progress = bool(config["show_progress"])
        self.item_id_embedding = nn.Embedding(self.n_items, config["hidden_size"], padding_idx=0)
        # normal(0, initializer_range), or xavier with sasrec_variant: official (the official code's)
        self.item_id_embedding.apply(weight_init(config) if config["backbone"] == "SASRec" else self._init_weights)
        with torch.no_grad():
            self.item_id_embedding.weight[0].zero_()
        self.backbone_name = config["backbone"]
        self.backbone = build_backbone(config, dataset)
        self.item_tower = ItemTower(config, dataset, adapt=self.adapt_foundation) if self.has_item_tower else None
        self._tables: dict[int | None, torch.Tensor] = {}  # item tables of this evaluation, by group
        if self.loss_type == "INBATCH":
            counts = torch.bincount(dataset.inter_feat[self.ITEM_ID], minlength=self.n_items).float()
            log_pop = item_log_popularity(counts) if config["popularity_correction"] else torch.zeros(self.n_items)
            self.register_buffer("log_popularity", log_pop, persistent=False)
        self.cmsa_weight = float(config["cmsa_weight"])
        self.alignment = self._build_alignment(config) if self.cmsa_weight > 0 else None
        self.item_id_norm_penalty = self._penalty(config)

    @staticmethod
    def _penalty(config) -> float:
        value = option(config, "item_id_norm_penalty", 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:  # NaN fails >= 0
            raise ValueError(f"item_id_norm_penalty must be a number >= 0 (the weight of the item ID table's norm in "
                             f"the loss; the official code's l2_emb is 1e-6), got {value!r}.")
        return float(value)

    def id_norm_loss(self) -> torch.Tensor | float:
        """``item_id_norm_penalty`` x the Frobenius norm (not squared) of the trainable item ID table: the
        official code's ``l2_emb`` term, added to every step's loss. Tiny as a loss, but Adam scales each
        coordinate's update by its own gradient history, so rows that seldom get a recommendation gradient
        still shrink: only a run tells whether it matters."""
        if not self.item_id_norm_penalty:
            return 0.0
        return self.item_id_norm_penalty * self.item_id_embedding.weight.norm()

    @classmethod
    def training_loader(cls, config, dataset, sampler, group_of_user=None, shuffle=True):
        """The training batches this model's backbone needs (``data_preparation`` calls it)."""
        return get_backbone(config["backbone"]).training_loader(config, dataset, sampler, group_of_user, shuffle)

    def _build_alignment(self, config) -> CrossModalAlignment:
        tower = self.item_tower
        if tower is None:
            raise ValueError(f"cmsa_weight > 0 aligns the text and image vectors; {type(self).__name__} has none "
                             "(ID embeddings only): set cmsa_weight: 0.")
        if len(tower.modalities) != 2:
            raise ValueError(f"cmsa_weight > 0 aligns two modalities; this run has {tower.modalities}. "
                             "Give the items titles and images (image_dir), or set cmsa_weight: 0.")
        widths = tower.modality_dims  # the per-modality vectors the family returns
        return CrossModalAlignment({m: widths[m] for m in tower.modalities}, align_dim=config["cmsa_dim"],
                                   temperature=config["cmsa_temperature"], variant=config["cmsa_variant"])

    def _init_weights(self, module):
        init_weights(module, self.initializer_range)

    # --- item vectors --------------------------------------------------------------------------------

    def id_embedding_for(self, group: int | None) -> nn.Embedding:
        """The ID embeddings of one group's items (PerPEFT's global path keeps stage 1's)."""
        return self.item_id_embedding

    def backbone_for(self, group: int | None):
        """The backbone that scores one group's users (PerPEFT's global path keeps stage 1's)."""
        return self.backbone

    # The two methods below are the only ones that read the item tower for vectors: without one
    # (has_item_tower False) the item vector is the ID embedding.

    def item_vectors(self, items: torch.Tensor, group: int | None = None) -> torch.Tensor:
        vectors = self.id_embedding_for(group)(items)
        if self.item_tower is None:
            return vectors
        if self.item_tower.n_groups:
            self.item_tower.activate(group)
        return vectors + self.item_tower(items)

    def item_vectors_and_alignment(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
        """Item vectors of distinct ``items`` under the active adapter, and the cross-modal alignment
        loss over those that have both modalities (0 when cmsa_weight is 0)."""
        vectors = self.item_id_embedding(items)
        if self.item_tower is None:
            return vectors, 0.0
        parts, per_modality = self.item_tower.encode(items)
        vectors = vectors + self.item_tower.project(parts)
        if self.alignment is None:
            return vectors, 0.0
        both = self.item_tower.present(items)
        return vectors, self.alignment({m: v[both] for m, v in per_modality.items()})

    def item_table(self, group: int | None = None) -> torch.Tensor:
        """Every item's vector under one group's adapter (None: the global one), computed once per
        evaluation (batched, no grad) and reused until the model goes back to training."""
        if group not in self._tables or self.training:
            items = torch.arange(self.n_items, device=self.item_id_embedding.weight.device)
            chunks = items.split(self.item_tower.encode_batch_size if self.item_tower is not None else self.n_items)
            desc = "Item table" if group is None else f"Item table, group {group}"
            with torch.no_grad():
                rows = [self.item_vectors(c, group) for c in tqdm(chunks, desc=desc, disable=not self.show_progress,
                                                                   leave=False)]  # fmt: skip
            self._tables[group] = torch.cat(rows)
        return self._tables[group]

    def set_item_table(self, group: int | None, table: torch.Tensor) -> None:
        """Use ``table`` [n_items, H] as one group's item table (None: the global one) until the model next
        goes to train()/eval(): tables computed elsewhere (by several processes, or saved for serving)."""
        if table.shape[0] != self.n_items:
            raise ValueError(f"an item table needs {self.n_items} rows (one per item id), got {tuple(table.shape)}.")
        self._tables[group] = table

    def train(self, mode: bool = True):
        # Tables are built once per evaluation: every train()/eval() call (RecBole's evaluate starts
        # with eval()) drops them, since parameters may have changed in between.
        self._tables = {}
        return super().train(mode)

    # --- training ------------------------------------------------------------------------------------

    def encode_batch(self, wanted: torch.Tensor, interaction):
        """Each distinct item of ``wanted`` (any shape) and, under SAMPLED_SOFTMAX, of the batch's shared
        negatives through the item path once (one torch.unique pass: here, not in each backbone's
        batch_items, so that every model gets it). Returns (items, vectors, alignment loss, the index of each
        ``wanted`` entry in ``items`` [wanted.shape], and a function that gives the shared negatives
        (SharedNegatives, or None) from the vectors the loss scores them in, by default the encoded ones)."""
        shared = interaction[SHARED_NEGATIVES][0] if self.loss_type == SAMPLED_SOFTMAX else None
        flat = wanted.reshape(-1) if shared is None else torch.cat([wanted.reshape(-1), shared])
        items, inverse = torch.unique(flat, return_inverse=True)
        vectors, alignment = self.item_vectors_and_alignment(items)
        own = inverse[: wanted.numel()].view(wanted.shape)

        def negatives(space: torch.Tensor | None = None) -> SharedNegatives | None:
            if shared is None:
                return None
            chosen = space[shared] if space is not None else vectors[inverse[wanted.numel() :]]
            return SharedNegatives(shared, chosen, interaction[SHARED_NEG_LOG_Q][0])

        return items, vectors, alignment, own, negatives

    def calculate_loss(self, interaction):
        items, vectors, alignment, own, negatives = self.encode_batch(self.backbone.batch_items(interaction),
                                                                      interaction)  # fmt: skip
        triples = self.backbone.triples(interaction, items, vectors, own)
        # LightGCN scores the shared negatives in its propagated table (item_space); SASRec as encoded.
        loss = self.recommendation_loss(triples, items, vectors, negatives(triples.item_space)) + triples.extra_loss
        return loss + self.cmsa_weight * alignment + self.id_norm_loss()

    def recommendation_loss(self, triples, items, vectors, shared: SharedNegatives | None = None) -> torch.Tensor:
        """``loss_type`` over the backbone's (user, positive, negative) triples; ``items``/``vectors``
        are the batch's distinct items (the in-batch candidates); ``shared`` the batch's shared negatives
        (SAMPLED_SOFTMAX)."""
        if self.loss_type == SAMPLED_SOFTMAX:
            if shared is None:
                raise ValueError(f"{type(self).__name__}: loss_type SAMPLED_SOFTMAX needs the batch's shared "
                                 "negatives (the training loader draws them when loss_type is SAMPLED_SOFTMAX).")
            return sampled_softmax_ce(triples.user, triples.pos, triples.pos_items, shared.vectors, shared.items,
                                      shared.log_q)  # fmt: skip
        if self.loss_type == "INBATCH":
            if triples.candidate_items is not None:
                items, vectors = triples.candidate_items, triples.candidate_vectors
            real = items > 0  # padding (id 0) is no candidate
            return inbatch_popularity_ce(triples.user, triples.pos_items, vectors[real], items[real],
                                         self.log_popularity)  # fmt: skip
        pos_logits = (triples.user * triples.pos).sum(-1)
        neg_logits = (triples.user * triples.neg).sum(-1)
        if self.loss_type == "BPR":
            return F.softplus(neg_logits - pos_logits).mean()
        # Eq. 1: -log σ(pos) - log(1 - σ(neg)) at every training position.
        return (F.softplus(-pos_logits) + F.softplus(neg_logits)).mean()

    # --- evaluation ----------------------------------------------------------------------------------

    def user_vectors(self, interaction, group: int | None = None) -> torch.Tensor:
        return self.backbone_for(group).user_vectors(interaction, self.item_table(group))

    def scores(self, interaction, group: int | None = None) -> torch.Tensor:
        """[B, n_items] scores of an evaluation batch's users, all under one group's model."""
        table = self.backbone_for(group).scoring_table(self.item_table(group))
        return self.user_vectors(interaction, group) @ table.T

    def full_sort_predict(self, interaction):
        return self.scores(interaction)

    def predict(self, interaction):
        table = self.backbone.scoring_table(self.item_table())
        return (self.user_vectors(interaction) * table[interaction[self.ITEM_ID]]).sum(-1)

    # --- accounting and checkpoints --------------------------------------------------------------------

    def parameter_components(self) -> dict:
        tower = self.item_tower
        return {
            # peft: only the adapter's parameters of the foundation are trainable
            "peft_adapter" if tower.side is None else "side_network": tower.adapter_module(),
            "projector": tower.projector,
            "missing_modality_placeholders": tower.placeholders,
            "item_id_embedding": self.item_id_embedding,
            "backbone": self.backbone,
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

    # Hooks of the two-stage models (``TwoStageGrouped.load_global``), here so that a mechanism's
    # override is found before the mixin along the MRO.
    def is_fresh_key(self, key: str) -> bool:
        """Whether a state key is one a GlobalPEFT state lacks (derived by :meth:`after_global_loaded`
        or left at its fresh initialisation)."""
        return False

    def adapt_global_state(self, state: dict) -> dict:
        """A GlobalPEFT state made to fit this model."""
        return state

    def after_global_loaded(self) -> None:
        """Derive what a GlobalPEFT state does not hold (e.g. PerPEFT's per-group copies)."""

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        missing = [k for k in result.missing_keys if not self._is_frozen_foundation_key(k, trainable)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"Checkpoint does not match {type(self).__name__}: missing {missing}, "
                f"unexpected {result.unexpected_keys}. Was it written with other peft/encoder settings?"
            )
        self._tables = {}
        return result
