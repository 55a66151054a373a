"""Personalisation baselines on the GlobalPEFT item path (PerPEFT paper §4.1.3, types 4 and 5).

Items go through the same item tower as GlobalPEFT (one global adapter and projector, plus ID
embeddings) and the same SASRec encoder and Eq. 1 loss; what differs is a *personal vector* that
enters the sequence encoder, in one of two ways:

- :class:`PromptPersonalVector` (level 1, personalised-prompt style): the vector is an extra element of
  the user's sequence (the encoder has ``MAX_ITEM_LIST_LENGTH + 1`` positions): before the items
  (``personal_vector_position: start``, a prompt every item attends to; the last item's output is the
  user representation) or after them at ``item_length`` (``end``; RecBole sequences are left-aligned and
  zero-padded; the user representation is the output there, which sees every item).
- :class:`ConcatPersonalVector` (level 2, SSE-PT style): the vector is concatenated with every item
  vector and ``Linear(2H, H)`` maps the pair back to the encoder's width.

The vector comes from the user id (``personal_source = "user"``: one embedding per user) or from the
user's interest group (``"group"``: one embedding per group; :class:`GroupPersonalisation`, the
groups from the same two-stage run as PerPEFT, ``recbole_perpeft.two_stage``)."""

from __future__ import annotations

from logging import getLogger

import numpy as np
import torch
from torch import nn

from recbole_perpeft.adapters.registry import option
from recbole_perpeft.data.dataloader import NEG_LIST, TARGET_LIST
from recbole_perpeft.grouping import check_grouping, grouping_source
from recbole_perpeft.model.backbones.base import Triples
from recbole_perpeft.model.sequence_encoder import build_sequence_encoder
from recbole_perpeft.model.sequential_recommender.globalpeft import GlobalPEFT
from recbole_perpeft.two_stage import TwoStageTrainer


class TwoStageGrouped:
    """Mixin of the models trained in two stages with user interest groups (PerPEFT, the group-level
    baselines, SharedGroupPEFT; put it first among the bases): the registry gives them
    :class:`~recbole_perpeft.two_stage.TwoStageTrainer`, which trains GlobalPEFT, groups the users and
    calls ``load_global(global_state, groups)`` on the model it was built with.

    Its YAML (``recbole_perpeft/properties/model/TwoStageGrouped.yaml``: n_groups, grouping_method,
    stage epochs, ...) is read for every subclass, since the config extends YAMLs along the class MRO."""

    trainer_class = TwoStageTrainer
    user_groups = None  # recbole_perpeft.grouping.UserGroups, once set_groups ran

    def __init__(self, config, dataset):
        # Before anything is built: n_groups copies of an adapter are built with the model, and a bad
        # n_groups would otherwise cost that (or stage 1) before it is refused.
        n_users = len(np.unique(dataset.inter_feat[dataset.uid_field].numpy()))
        check_grouping(config["n_groups"], config["grouping_method"], n_users)
        grouping_source(config)
        super().__init__(config, dataset)

    def load_global(self, global_state: dict, groups) -> None:
        """Start stage 2 from a trained GlobalPEFT: every key of this model not ``is_fresh_key`` must
        come from ``global_state``, and nothing in it may be left over (hooks: GlobalPEFT's)."""
        result = self.load_state_dict(self.adapt_global_state(global_state), strict=False)
        if result.unexpected_keys:
            raise RuntimeError(f"Not a GlobalPEFT state for this configuration: {result.unexpected_keys}")
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        missing = [
            k for k in result.missing_keys
            if not self._is_frozen_foundation_key(k, trainable) and not self.is_fresh_key(k)
        ]  # fmt: skip
        if missing:
            raise RuntimeError(f"The GlobalPEFT state lacks {missing}: not a GlobalPEFT of this configuration.")
        self.after_global_loaded()
        self.set_groups(groups)

    def set_groups(self, groups) -> None:
        self.user_groups = groups


class PersonalisedGlobalPEFT(GlobalPEFT):
    """GlobalPEFT plus a personal vector per user or per group; subclasses say where it enters the
    sequence encoder (:meth:`encode_personalised`) and which output position represents the user.
    Both mechanisms live inside SASRec's sequence, so these models need ``backbone: SASRec``."""

    personal_source = "user"  # "user": by user id; "group": by the user's interest group

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        if self.backbone_name != "SASRec":
            raise ValueError(f"{type(self).__name__} puts a personal vector into SASRec's sequence: it needs "
                             f"backbone: SASRec, not {self.backbone_name}.")
        hidden = config["hidden_size"]
        if self.personal_source == "group":
            n_groups = config["n_groups"]
            if not isinstance(n_groups, int) or n_groups < 1:
                raise ValueError(f"{type(self).__name__} needs n_groups >= 1, got {n_groups!r}.")
            self.register_buffer("group_of_user", torch.full((dataset.user_num,), -1, dtype=torch.long))
            self.personal_embedding = nn.Embedding(n_groups, hidden)
        elif self.personal_source == "user":
            self.personal_embedding = nn.Embedding(dataset.user_num, hidden, padding_idx=0)
        else:
            raise ValueError(f"personal_source must be 'user' or 'group', not {self.personal_source!r}.")
        self.personal_embedding.weight.data.normal_(mean=0.0, std=self.initializer_range)
        if self.personal_source == "user":
            self.personal_embedding.weight.data[0].zero_()

    @property
    def sequence_encoder(self):
        return self.backbone.encoder

    # --- where the vector comes from ---------------------------------------------------------------------

    def personal_vectors(self, user_ids: torch.Tensor) -> torch.Tensor:
        """[B] internal user ids -> [B, H]: the user's own embedding, or its group's."""
        if self.personal_source == "user":
            return self.personal_embedding(user_ids)
        groups = self.group_of_user[user_ids]
        if (groups < 0).any():
            raise ValueError(
                f"{type(self).__name__} got users without a group ({user_ids[groups < 0].tolist()[:5]}...): "
                "load the run's groups (set_groups)."
            )
        return self.personal_embedding(groups)

    # --- where it enters (per mechanism) ---------------------------------------------------------------

    def encode_personalised(self, item_emb, item_seq, item_seq_len, personal) -> torch.Tensor:
        """[B, L, H] item vectors, [B, L] ids, [B] lengths, [B, H] personal vectors -> the sequence
        encoder's outputs [B, L', H] (L' = L, or L + 1 with the vector appended)."""
        raise NotImplementedError

    def user_positions(self, item_seq_len: torch.Tensor) -> torch.Tensor:
        """[B] index of the output that represents each user (the prediction)."""
        raise NotImplementedError

    def align(self, per_position: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        """A [B, L, ...] per-position tensor (targets, negatives) laid out like the encoder's outputs."""
        return per_position

    # --- the model ---------------------------------------------------------------------------------------

    def user_vectors(self, interaction, group=None):
        """User representations [B, H] for sequences of known users."""
        table = self.item_table(group)
        seq, lengths = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        output = self.encode_personalised(table[seq], seq, lengths, self.personal_vectors(interaction[self.USER_ID]))
        return self.gather_indexes(output, self.user_positions(lengths))

    def calculate_loss(self, interaction):
        """GlobalPEFT's loss (Eq. 1, or loss_type) at every position the encoder outputs for a target
        (see :meth:`align`), plus the cross-modal alignment loss when cmsa_weight > 0. Every distinct item
        of the batch (sequence, targets, per-position negatives or, under SAMPLED_SOFTMAX, the shared
        negatives) goes through the item tower once."""
        seq, pos = interaction[self.ITEM_SEQ], interaction[TARGET_LIST]
        lengths = interaction[self.ITEM_SEQ_LEN]
        per_position = [seq, pos] + ([interaction[NEG_LIST]] if NEG_LIST in interaction else [])
        items, vectors, alignment, own, negatives = self.encode_batch(torch.stack(per_position), interaction)
        emb = vectors[own]  # [2 or 3, B, L, H]: no per-position negatives under SAMPLED_SOFTMAX
        personal = self.personal_vectors(interaction[self.USER_ID])
        output = self.encode_personalised(emb[0], seq, lengths, personal)
        targets = self.align(pos, lengths)
        mask = self.backbone.target_mask(targets)  # loss_positions, as GlobalPEFT's
        neg = self.align(emb[2], lengths)[mask] if len(emb) == 3 else None
        triples = Triples(user=output[mask], pos=self.align(emb[1], lengths)[mask], neg=neg, pos_items=targets[mask])
        loss = self.recommendation_loss(triples, items, vectors, negatives()) + self.cmsa_weight * alignment
        return loss + self.id_norm_loss()

    # --- accounting ----------------------------------------------------------------------------------------

    def personal_components(self) -> dict:
        """The mechanism's own trainable modules besides the embedding (shared by all users)."""
        return {}

    def parameter_components(self) -> dict:
        source = self.personal_source
        components = {f"{source}_specific/{source}_embeddings": self.personal_embedding}
        components.update({f"global/{name}": part for name, part in super().parameter_components().items()})
        components.update({f"global/{name}": part for name, part in self.personal_components().items()})
        return components

    def new_state_prefixes(self) -> tuple[str, ...]:
        """State keys a GlobalPEFT checkpoint does not have (initialised fresh by load_global)."""
        return ("personal_embedding.", "group_of_user")

    def is_fresh_key(self, key: str) -> bool:
        return key.startswith(self.new_state_prefixes())

    def adapt_global_state(self, state: dict) -> dict:
        """A GlobalPEFT state made to fit this model (load_global)."""
        return state


PERSONAL_VECTOR_POSITIONS = ("start", "end")


class PromptPersonalVector(PersonalisedGlobalPEFT):
    """Level 1: the personal vector as one more sequence element (the encoder gets one more position).

    ``personal_vector_position``:

    - ``start`` (a personalised prompt): the vector before the items, which move one position to the right.
      Every item position is trained with Eq. 1 as in GlobalPEFT and the last item's output, which attends to
      the prompt, is the user's representation; the prompt's own output has no target.
    - ``end``: the vector after the last item, at index ``item_length``. Trained at every item position plus
      the user position (whose target and negative are the last position's); predictions use the output at
      the user position. Its one trained query per user and epoch makes it the weaker layout (README)."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.personal_vector_position = str(option(config, "personal_vector_position", "start")).lower()
        if self.personal_vector_position not in PERSONAL_VECTOR_POSITIONS:
            raise ValueError(f"personal_vector_position must be start (a prompt before the items) or end (after "
                             f"the last item), got {config['personal_vector_position']!r}.")  # fmt: skip
        self.backbone.encoder = build_sequence_encoder(config, self.max_seq_length + 1)

    @property
    def at_start(self) -> bool:
        return self.personal_vector_position == "start"

    @staticmethod
    def _put_at_end(per_position: torch.Tensor, item_seq_len: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """[B, L, ...] -> [B, L + 1, ...] with ``values`` [B, ...] at index ``item_seq_len`` of each row."""
        extended = torch.cat([per_position, per_position.new_zeros(per_position[:, :1].shape)], dim=1)
        rows = torch.arange(len(per_position), device=per_position.device)
        return extended.index_put((rows, item_seq_len), values)

    @staticmethod
    def _put_first(per_position: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """[B, L, ...] -> [B, L + 1, ...] with ``values`` [B, ...] at index 0."""
        return torch.cat([values.unsqueeze(1), per_position], dim=1)

    def encode_personalised(self, item_emb, item_seq, item_seq_len, personal):
        personal = personal.to(item_emb.dtype)
        # The attention mask treats the personal position as a real element (any id > 0 marks it).
        if self.at_start:
            emb, marker = self._put_first(item_emb, personal), self._put_first(item_seq, torch.ones_like(item_seq_len))
        else:
            emb = self._put_at_end(item_emb, item_seq_len, personal)
            marker = self._put_at_end(item_seq, item_seq_len, torch.ones_like(item_seq_len))
        return self.sequence_encoder(emb, self.get_attention_mask(marker))

    def user_positions(self, item_seq_len):
        return item_seq_len  # start: the last item, one to the right; end: the personal vector

    def align(self, per_position, item_seq_len):
        if self.at_start:  # no target at the prompt
            return self._put_first(per_position, per_position.new_zeros(per_position[:, 0].shape))
        rows = torch.arange(len(per_position), device=per_position.device)
        return self._put_at_end(per_position, item_seq_len, per_position[rows, item_seq_len - 1])

    def adapt_global_state(self, state: dict) -> dict:
        """A GlobalPEFT state has max_seq_length position embeddings: the items keep theirs (start: shifted by
        one, as the items are) and the personal vector's position keeps its fresh initialisation."""
        key = "backbone.encoder.position_embedding.weight"
        own = self.sequence_encoder.position_embedding.weight
        if key in state and state[key].shape[0] == own.shape[0] - 1:
            state = dict(state)
            old = state[key].to(own.device)
            state[key] = torch.cat([own.detach()[:1], old] if self.at_start else [old, own.detach()[-1:]])
        return state


class ConcatPersonalVector(PersonalisedGlobalPEFT):
    """Level 2: ``Linear(2H, H)([item ‖ personal])`` at every position before SASRec.

    The item half of the linear map starts as the identity (the encoder first sees GlobalPEFT's item
    vectors, slightly moved by the personal half, which starts small and random)."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        hidden = config["hidden_size"]
        self.personal_fusion = nn.Linear(2 * hidden, hidden)
        with torch.no_grad():
            self.personal_fusion.weight.zero_()
            self.personal_fusion.weight[:, :hidden].copy_(torch.eye(hidden))
            self.personal_fusion.weight[:, hidden:].normal_(mean=0.0, std=self.initializer_range)
            self.personal_fusion.bias.zero_()

    def fuse(self, item_emb: torch.Tensor, personal: torch.Tensor) -> torch.Tensor:
        """[B, L, H] items, [B, H] personal vectors -> [B, L, H] encoder input."""
        personal = personal.to(item_emb.dtype).unsqueeze(1).expand_as(item_emb)
        return self.personal_fusion(torch.cat([item_emb, personal], dim=-1))

    def encode_personalised(self, item_emb, item_seq, item_seq_len, personal):
        return self.sequence_encoder(self.fuse(item_emb, personal), self.get_attention_mask(item_seq))

    def user_positions(self, item_seq_len):
        return item_seq_len - 1

    def personal_components(self) -> dict:
        return {"personal_fusion": self.personal_fusion}

    def new_state_prefixes(self) -> tuple[str, ...]:
        return (*super().new_state_prefixes(), "personal_fusion.")


class GroupPersonalisation(TwoStageGrouped):
    """Mixin for a :class:`PersonalisedGlobalPEFT` whose vectors come from the user's interest group
    (put it first among the bases). Stage 2 of the two-stage run starts from the trained GlobalPEFT:
    everything but the group embeddings (and the mechanism's new parts) is loaded from it."""

    personal_source = "group"

    def after_global_loaded(self) -> None:
        getLogger().info(f"{type(self).__name__}: GlobalPEFT loaded; new: {', '.join(self.new_state_prefixes())}")

    def set_groups(self, groups) -> None:
        if groups.n_groups != self.personal_embedding.num_embeddings:
            raise ValueError(
                f"{groups.n_groups} groups given to a model built for {self.personal_embedding.num_embeddings}."
            )
        labels = torch.as_tensor(groups.labels, dtype=torch.long)
        if labels.shape != self.group_of_user.shape:
            raise ValueError(f"Group labels for {len(labels)} users; the model has {len(self.group_of_user)}.")
        super().set_groups(groups)
        self.group_of_user.copy_(labels)
