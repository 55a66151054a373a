"""PerPEFT (paper §3.3): one PEFT module and projector per user interest group.

Built from a trained GlobalPEFT (the two-stage run in ``recbole_perpeft.two_stage``): every
group's adapter and projector start as copies of the global ones; the item ID embeddings and SASRec
are shared. A user's items are always encoded with its own group's adapter and projector, in
training (group-homogeneous batches) and in evaluation (one item table per group)."""

from __future__ import annotations

import copy

import numpy as np
import torch
from tqdm import tqdm

from recbole_perpeft.data.dataloader import GROUP_ID
from recbole_perpeft.model.personalisation import TwoStageGrouped
from recbole_perpeft.model.sequential_recommender.globalpeft import GlobalPEFT


class PerPEFT(TwoStageGrouped, GlobalPEFT):  # TwoStageGrouped: grouped = True, two-stage YAML keys
    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        if not self.item_tower.peft_models and self.item_tower.side is None:
            raise ValueError("PerPEFT needs a PEFT module to personalise: set peft_type (e.g. LORA, IA3, IISAN).")
        n_groups = config["n_groups"]
        self.item_tower.add_groups(n_groups)
        self.register_buffer("group_of_user", torch.full((dataset.user_num,), -1, dtype=torch.long))
        # The global path (stage-1 ID embeddings and SASRec, frozen) serves users never seen in
        # training: their interest vector is computed the way the groups were fitted.
        self.global_item_id_embedding = copy.deepcopy(self.item_id_embedding).requires_grad_(False)
        self.global_sequence_encoder = copy.deepcopy(self.sequence_encoder).requires_grad_(False)
        self.user_groups = None  # recbole_perpeft.grouping.UserGroups, for assigning new users
        self._group_tables: dict[int | None, torch.Tensor] = {}

    # --- initialisation from GlobalPEFT --------------------------------------------------------------

    def load_global(self, global_state: dict, groups) -> None:
        """Copy a trained GlobalPEFT's state into the shared and every group's components."""
        result = self.load_state_dict(global_state, strict=False)
        if result.unexpected_keys:
            raise RuntimeError(f"Not a GlobalPEFT state for this configuration: {result.unexpected_keys}")
        with torch.no_grad():
            self.global_item_id_embedding.load_state_dict(self.item_id_embedding.state_dict())
            self.global_sequence_encoder.load_state_dict(self.sequence_encoder.state_dict())
        self.item_tower.copy_global_to_groups()
        self._group_tables = {}
        self.set_groups(groups)

    def set_groups(self, groups) -> None:
        if groups.n_groups != self.item_tower.n_groups:
            raise ValueError(f"{groups.n_groups} groups given to a model built for {self.item_tower.n_groups}.")
        self.user_groups = groups
        self.group_of_user.copy_(torch.as_tensor(groups.labels, dtype=torch.long))

    # --- training ------------------------------------------------------------------------------------

    def calculate_loss(self, interaction):
        groups = interaction[GROUP_ID]
        self.item_tower.activate(int(groups[0]))  # batches are group-homogeneous
        return super().calculate_loss(interaction)

    def train(self, mode: bool = True):
        # Tables are built once per evaluation: dropped when training starts or ends (parameters
        # change), kept when an evaluating model is put in eval mode again (e.g. by recommend(), or
        # after load_tables()).
        if mode or self.training:
            self._group_tables = {}
        return super().train(mode)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._group_tables = {}  # built from the parameters just replaced
        return result

    # --- evaluation and serving ----------------------------------------------------------------------

    def group_table(self, group: int | None) -> torch.Tensor:
        """The item table under one group's adapter (None: the global one), once per evaluation."""
        if group not in self._group_tables or self.training:
            self.item_tower.activate(group)
            id_embedding = self.global_item_id_embedding if group is None else self.item_id_embedding
            items = torch.arange(self.n_items, device=self.group_of_user.device)
            with torch.no_grad():
                rows = [id_embedding(c) + self.item_tower(c) for c in items.split(self.item_tower.encode_batch_size)]
            self._group_tables[group] = torch.cat(rows)
        return self._group_tables[group]

    def group_tables(self) -> list[torch.Tensor]:
        groups = range(self.item_tower.n_groups)
        return [self.group_table(g) for g in tqdm(groups, desc="Group item tables", disable=not self.show_progress)]

    def item_table(self):
        raise RuntimeError("PerPEFT has one item table per group: use group_table(group).")

    def _user_vectors(self, item_seq, item_seq_len, table, encoder):
        output = encoder(table[item_seq], self.get_attention_mask(item_seq))
        return self.gather_indexes(output, item_seq_len - 1)

    def full_sort_predict(self, interaction):
        """Each user scored against its own group's table, over the whole item set."""
        tables = self.group_tables()
        seq, lengths = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        groups = self.group_of_user[interaction[self.USER_ID]]
        if (groups < 0).any():
            raise ValueError("full_sort_predict got users without a group; use recommend() for new users.")
        scores = torch.empty(len(seq), self.n_items, device=seq.device)
        for group in groups.unique().tolist():
            rows = groups == group
            user = self._user_vectors(seq[rows], lengths[rows], tables[group], self.sequence_encoder)
            scores[rows] = user @ tables[group].T
        return scores

    def predict(self, interaction):
        scores = self.full_sort_predict(interaction)
        return scores.gather(1, interaction[self.ITEM_ID].unsqueeze(1)).squeeze(1)

    @torch.no_grad()
    def interest_vectors(self, item_seq, item_seq_len) -> torch.Tensor:
        """Interest vectors on the global (stage-1) path: what the groups were fitted on."""
        return self._user_vectors(item_seq, item_seq_len, self.group_table(None), self.global_sequence_encoder)

    @torch.no_grad()
    def recommend(self, history, k: int = 10) -> tuple[list[int], int]:
        """Top-k internal item ids for a user not seen in training, from its item history (internal
        ids, oldest first), and the group it was assigned to."""
        if self.user_groups is None:
            raise RuntimeError("No grouping attached: load the run's groups file (set_groups).")
        was_training = self.training
        self.eval()
        seq = torch.as_tensor(list(history)[-self.max_seq_length:], dtype=torch.long).unsqueeze(0)
        length = torch.tensor([seq.shape[1]])
        interest = self.interest_vectors(seq, length).cpu().numpy()
        group = int(self.user_groups.assign(interest.astype(np.float32))[0])
        table = self.group_table(group)
        scores = self._user_vectors(seq, length, table, self.sequence_encoder)[0] @ table.T
        scores[0] = -torch.inf
        items = torch.topk(scores, k).indices.tolist()
        self.train(was_training)
        return items, group

    def save_tables(self, path: str) -> None:
        """Every group's item table and the global one, for serving without the foundation model."""
        tables = {"global": self.group_table(None), "groups": torch.stack(self.group_tables())}
        torch.save({k: v.cpu() for k, v in tables.items()}, path)

    def load_tables(self, path: str) -> None:
        """Serve from saved tables (puts the model in eval mode: training mode recomputes them)."""
        self.eval()
        tables = torch.load(path, map_location=self.group_of_user.device, weights_only=True)
        self._group_tables = {None: tables["global"], **dict(enumerate(tables["groups"]))}

    # --- accounting (paper Table 8) -------------------------------------------------------------------

    def parameter_components(self) -> dict:
        tower = self.item_tower
        group_adapters = sum(p.numel() for g in range(tower.n_groups) for p in tower.group_adapter_parameters(g))
        return {
            "group_specific/side_networks" if tower.side else "group_specific/peft_adapters": group_adapters,
            "group_specific/projectors": tower.group_projectors,
            "global/item_id_embedding": self.item_id_embedding,
            "global/sequence_encoder": self.sequence_encoder,
            "global/missing_modality_placeholders": tower.placeholders,
            "global/cmsa_heads": self.alignment or 0,
        }
