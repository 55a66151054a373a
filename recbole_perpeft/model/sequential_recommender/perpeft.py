"""PerPEFT (paper §3.3): one PEFT module and projector per user interest group.

Built from a trained GlobalPEFT (``recbole_perpeft.two_stage.TwoStageTrainer``): every group's
adapter and projector start as copies of the global ones; the item ID embeddings and the backbone
(SASRec or LightGCN) are shared. A user's items are always encoded with its own group's adapter and projector, in
training (group-homogeneous batches) and in evaluation (one item table per group).

Beyond the paper (its limitation D.3.2), ``soft_groups: k`` > 1 scores a user at evaluation and in
:meth:`PerPEFT.recommend` as the weighted mix of its scores under its k most likely groups' models
(weights: ``UserGroups.assign_soft``, by the grouping's own rule). Training stays hard."""

from __future__ import annotations

import copy

import numpy as np
import torch
from recbole.data.interaction import Interaction
from tqdm import tqdm

from recbole_perpeft.adapters.registry import option
from recbole_perpeft.data.dataloader import GROUP_ID
from recbole_perpeft.grouping import check_soft_groups
from recbole_perpeft.model.personalisation import TwoStageGrouped
from recbole_perpeft.model.sequential_recommender.globalpeft import GlobalPEFT


class PerPEFT(TwoStageGrouped, GlobalPEFT):  # TwoStageGrouped: the two-stage trainer and YAML keys
    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        if not self.item_tower.peft_models and self.item_tower.side is None:
            raise ValueError("PerPEFT needs a PEFT module to personalise: set peft_type (e.g. LORA, IA3, IISAN).")
        self.item_tower.add_groups(config["n_groups"])
        self.register_buffer("group_of_user", torch.full((dataset.user_num,), -1, dtype=torch.long))
        # The global path (stage-1 ID embeddings and backbone, frozen) serves users never seen in
        # training: their interest vector is computed the way the groups were fitted.
        self.global_item_id_embedding = copy.deepcopy(self.item_id_embedding).requires_grad_(False)
        self.global_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self._group_names = self._group_parameter_names()  # fixed from here on; read per key by load_global
        # Soft groups (checked here, before stage 1 trains; n_groups and grouping_method were checked above).
        self.soft_groups = option(config, "soft_groups", 1)
        self.soft_group_weighting = option(config, "soft_group_weighting", None)
        self.soft_group_temperature = option(config, "soft_group_temperature", None)
        check_soft_groups(self.soft_groups, self.soft_group_weighting, self.soft_group_temperature,
                          config["grouping_method"], config["n_groups"])  # fmt: skip
        if self.soft_groups > 1:
            # Derived from the grouping by set_groups, not checkpointed: a checkpoint is the same for any
            # soft_groups (training is hard), and one trained once can be evaluated with any k.
            shape = (dataset.user_num, self.soft_groups)
            self.register_buffer("soft_group_of_user", torch.full(shape, -1, dtype=torch.long), persistent=False)
            self.register_buffer("soft_weight_of_user", torch.zeros(shape), persistent=False)

    # --- initialisation from GlobalPEFT --------------------------------------------------------------

    def is_fresh_key(self, key: str) -> bool:
        """Group copies and the frozen global path: filled from the GlobalPEFT state, not in it."""
        if key.startswith(("global_", "group_of_user", "item_tower.global_")):
            return True
        return key in self._group_names

    def _group_parameter_names(self) -> set[str]:
        tower = self.item_tower
        ids = {id(p) for g in range(tower.n_groups) for p in tower.group_adapter_parameters(g)}
        ids |= {id(p) for p in tower.group_projectors.parameters()}
        return {name for name, p in self.named_parameters() if id(p) in ids}

    def after_global_loaded(self) -> None:
        with torch.no_grad():
            self.global_item_id_embedding.load_state_dict(self.item_id_embedding.state_dict())
            self.global_backbone.load_state_dict(self.backbone.state_dict())
        self.item_tower.copy_global_to_groups()

    def set_groups(self, groups) -> None:
        if groups.n_groups != self.item_tower.n_groups:
            raise ValueError(f"{groups.n_groups} groups given to a model built for {self.item_tower.n_groups}.")
        super().set_groups(groups)
        self.group_of_user.copy_(torch.as_tensor(groups.labels, dtype=torch.long))
        if self.soft_groups > 1:
            top, weights = groups.user_soft_groups(self.soft_groups, self.soft_group_weighting,
                                                   self.soft_group_temperature)  # fmt: skip
            self.soft_group_of_user.copy_(torch.from_numpy(top))
            self.soft_weight_of_user.copy_(torch.from_numpy(weights))

    # --- one group's model -----------------------------------------------------------------------------

    def id_embedding_for(self, group):
        return self.global_item_id_embedding if group is None else self.item_id_embedding

    def backbone_for(self, group):
        return self.global_backbone if group is None else self.backbone

    def calculate_loss(self, interaction):
        self.item_tower.activate(int(interaction[GROUP_ID][0]))  # batches are group-homogeneous
        return super().calculate_loss(interaction)

    def group_table(self, group: int | None) -> torch.Tensor:
        """The item table under one group's adapter (None: the global one), once per evaluation."""
        return self.item_table(group)

    def group_tables(self) -> list[torch.Tensor]:
        groups = range(self.item_tower.n_groups)
        return [self.item_table(g) for g in tqdm(groups, desc="Group item tables", disable=not self.show_progress)]

    # --- evaluation and serving ----------------------------------------------------------------------

    def full_sort_predict(self, interaction):
        """Each user scored against its own group's table, over the whole item set (``soft_groups`` > 1:
        the weighted mix of its scores under its k most likely groups)."""
        users = interaction[self.USER_ID]
        groups = self.group_of_user[users]
        if (groups < 0).any():
            raise ValueError("full_sort_predict got users without a group; use recommend() for new users.")
        if self.soft_groups > 1:
            top = self.soft_group_of_user[users]
            if (top < 0).any():
                raise RuntimeError(f"soft_groups={self.soft_groups}: no soft assignment for these users; load the "
                                   "run's groups file (set_groups) before evaluating.")
            return self.mixed_scores(interaction, top, self.soft_weight_of_user[users])
        scores = torch.empty(len(groups), self.n_items, device=groups.device)
        for group in groups.unique().tolist():
            rows = torch.nonzero(groups == group).flatten()
            scores[rows] = self.scores(interaction[rows], group)
        return scores

    def mixed_scores(self, interaction, top: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """[B, n_items]: sum over j of ``weights[:, j]`` times the scores under group ``top[:, j]``
        ([B, k] each; a row's groups are distinct). Each (user, group) pair is scored once, each
        group's table built once per evaluation."""
        scores = torch.zeros(len(top), self.n_items, device=weights.device)
        for group in top.unique().tolist():
            rows, slot = torch.nonzero(top == group, as_tuple=True)
            scores[rows] += weights[rows, slot].unsqueeze(1) * self.scores(interaction[rows], group)
        return scores

    def predict(self, interaction):
        scores = self.full_sort_predict(interaction)
        return scores.gather(1, interaction[self.ITEM_ID].unsqueeze(1)).squeeze(1)

    def _history_batch(self, item_seq, item_seq_len) -> Interaction:
        if self.backbone_name != "SASRec":
            raise ValueError(f"Serving a new user from its history needs the SASRec backbone, not "
                             f"{self.backbone_name} (a graph backbone has no vector for a user outside its graph).")
        device = self.group_of_user.device  # histories come as CPU tensors; the model may be on a GPU
        return Interaction({self.ITEM_SEQ: item_seq.to(device), self.ITEM_SEQ_LEN: item_seq_len.to(device)})

    @torch.no_grad()
    def interest_vectors(self, item_seq, item_seq_len) -> torch.Tensor:
        """Interest vectors on the global (stage-1) path: what the groups were fitted on."""
        return self.user_vectors(self._history_batch(item_seq, item_seq_len), None)

    @torch.no_grad()
    def recommend(self, history, k: int = 10) -> tuple[list[int], int]:
        """Top-k internal item ids for a user not seen in training, from its item history (internal
        ids, oldest first), and the group it was assigned to (``soft_groups`` > 1: ranked by the mix of
        its k most likely groups' scores; the group returned is the one with the most weight)."""
        if self.user_groups is None:
            raise RuntimeError("No grouping attached: load the run's groups file (set_groups).")
        was_training = self.training
        if was_training:  # (an evaluating model keeps its tables, e.g. those of load_tables)
            self.eval()
        seq = torch.as_tensor(list(history)[-self.max_seq_length:], dtype=torch.long).unsqueeze(0)
        batch = self._history_batch(seq, torch.tensor([seq.shape[1]]))
        interest = self.interest_vectors(batch[self.ITEM_SEQ], batch[self.ITEM_SEQ_LEN]).cpu().numpy()
        if self.soft_groups > 1:
            top, weights = self.user_groups.assign_soft(interest.astype(np.float32), self.soft_groups,
                                                        self.soft_group_weighting, self.soft_group_temperature)
            device = self.group_of_user.device
            group = int(top[0, 0])
            scores = self.mixed_scores(batch, torch.from_numpy(top).to(device), torch.from_numpy(weights).to(device))[0]
        else:
            group = int(self.user_groups.assign(interest.astype(np.float32))[0])
            scores = self.scores(batch, group)[0]
        scores[0] = -torch.inf
        items = torch.topk(scores, k).indices.tolist()
        if was_training:
            self.train()
        return items, group

    def save_tables(self, path: str) -> None:
        """Every group's item table and the global one, for serving without the foundation model."""
        tables = {"global": self.item_table(None), "groups": torch.stack(self.group_tables())}
        torch.save({k: v.cpu() for k, v in tables.items()}, path)

    def load_tables(self, path: str) -> None:
        """Serve from saved tables (puts the model in eval mode; a later train()/eval() call drops them)."""
        self.eval()
        tables = torch.load(path, map_location=self.group_of_user.device, weights_only=True)
        for group, table in {None: tables["global"], **dict(enumerate(tables["groups"]))}.items():
            self.set_item_table(group, table)

    # --- accounting (paper Table 8) -------------------------------------------------------------------

    def parameter_components(self) -> dict:
        tower = self.item_tower
        group_adapters = sum(p.numel() for g in range(tower.n_groups) for p in tower.group_adapter_parameters(g))
        return {
            "group_specific/side_networks" if tower.side else "group_specific/peft_adapters": group_adapters,
            "group_specific/projectors": tower.group_projectors,
            "global/item_id_embedding": self.item_id_embedding,
            "global/backbone": self.backbone,
            "global/missing_modality_placeholders": tower.placeholders,
            "global/cmsa_heads": self.alignment or 0,
        }
