"""A trained run, loaded back for recommendations: ``recbole_perpeft.load(checkpoint_or_result)``.

Any model trained through our entry point (ours and RecBole's) loads from its checkpoint alone: every
checkpoint holds the run's resolved config (``run_config``, resume.py), from which the run's own settings are
recovered as overrides of the property files (``analysis.loading.recovered_overrides``), so nothing such as
``user_sample_ratio`` must be given again. A checkpoint written before that is loaded through the run's result
JSON (its ``config``). ``--key=value`` overrides still win (``data_path`` on another machine, ``device``).

:func:`load` reads only the config; the dataset is rebuilt on first use of ``.dataset``, the model (and
with it the foundation model) on first use of ``.model``. A two-stage model gets its grouping from the groups
file beside the checkpoint. :meth:`TrainedRun.recommender` serves top-k by token with the full model
(:class:`Recommender`); :meth:`TrainedRun.export` writes the table export of recbole_perpeft/export.py."""

from __future__ import annotations

import os
from functools import cached_property

import numpy as np
import torch

from recbole_perpeft.serving import Request, TokenRecommender, seen_csr


class TrainedRun:
    """A run's checkpoint and resolved config; dataset and model are built when first asked for."""

    def __init__(self, checkpoint: str, resolved: dict, overrides: dict | None = None):
        self.checkpoint = checkpoint
        self.resolved = resolved
        self.model_name, self.dataset_name = str(resolved["model"]), str(resolved["dataset"])
        self.overrides = dict(overrides or {})

    @property
    def groups_file(self) -> str | None:
        from recbole_perpeft.analysis.loading import groups_path

        path = groups_path(self.checkpoint)
        return path if os.path.isfile(path) else None

    @cached_property
    def config(self):
        from recbole_perpeft.analysis.loading import recovered_overrides
        from recbole_perpeft.config import Config

        config_dict = recovered_overrides(self.model_name, self.dataset_name, self.resolved)
        config_dict["seed"] = int(self.resolved["seed"])
        if self.groups_file:  # (a group left empty by the grouping was dropped: the file's count is the model's)
            config_dict["n_groups"] = int(torch.load(self.groups_file, weights_only=True)["n_groups"])
        config_dict.update(self.overrides)
        return Config(model=self.model_name, dataset=self.dataset_name, config_dict=config_dict)

    @cached_property
    def loaders(self) -> tuple:
        """(train, valid, test) data loaders, as the run built them."""
        from recbole.utils import init_seed

        from recbole_perpeft.data import create_dataset, data_preparation
        from recbole_perpeft.utils import get_model

        init_seed(self.config["seed"], self.config["reproducibility"])
        return tuple(data_preparation(self.config, create_dataset(self.config), get_model(self.model_name)))

    @property
    def splits(self) -> tuple:
        """(train, valid, test) datasets."""
        return tuple(loader._dataset if hasattr(loader, "_dataset") else loader.dataset for loader in self.loaders)

    @property
    def dataset(self):
        return self.splits[0]

    @cached_property
    def model(self):
        from recbole.utils import init_seed

        from recbole_perpeft.resume import load_checkpoint
        from recbole_perpeft.utils import get_model

        init_seed(self.config["seed"], self.config["reproducibility"])
        model = get_model(self.model_name)(self.config, self.dataset).to(self.config["device"])
        state = load_checkpoint(self.checkpoint, map_location=self.config["device"])["state_dict"]
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"{self.checkpoint} does not fit the {self.model_name} rebuilt from its config "
                             f"({str(err)[:300]}).") from None  # fmt: skip
        if self.groups_file and hasattr(model, "set_groups"):
            from recbole_perpeft.grouping import UserGroups

            model.set_groups(UserGroups.from_state(torch.load(self.groups_file, weights_only=True)))
        return model.eval()

    def recommender(self, batch_size: int = 256) -> Recommender:
        return Recommender(self, batch_size)

    def export(self, directory: str, recommender: Recommender | None = None) -> str:
        """Write the table export (recbole_perpeft/export.py); ``recommender``: this run's, if built already."""
        from recbole_perpeft.export import export

        return export(self, directory, recommender)


def load(checkpoint_or_result: str, overrides: dict | None = None) -> TrainedRun:
    """A :class:`TrainedRun` from a checkpoint (``.pth``) or a run's result JSON (the checkpoint it names)."""
    from recbole_perpeft.analysis.loading import read_result
    from recbole_perpeft.resume import load_checkpoint

    path = str(checkpoint_or_result)
    result = None
    if path.endswith(".json"):
        result = read_result(path)
        if not result.get("checkpoint"):
            raise ValueError(f"result file {path} names no checkpoint (the run was not saved): nothing to load.")
        checkpoint = str(result["checkpoint"])
    else:
        checkpoint = path
    saved = load_checkpoint(checkpoint)
    resolved = saved.get("run_config") or (result or {}).get("config")
    if not resolved:
        raise ValueError(f"{checkpoint} was written before checkpoints held their config: load the run's result "
                         "JSON instead (recbole_perpeft.load('r.json'), or --result=r.json).")  # fmt: skip
    if str(resolved.get("model")) != str(saved["config"]["model"]):
        raise ValueError(f"the result JSON is a {resolved.get('model')} run, {checkpoint} a "
                         f"{saved['config']['model']} checkpoint: give the pair one run wrote.")  # fmt: skip
    return TrainedRun(checkpoint, resolved, overrides)


# --- the full model, by token ----------------------------------------------------------------------------


def known_users(splits, n_users: int, max_len: int):
    """Each known user's last ``max_len`` items (left-aligned) and lengths, and every item it has (CSR), from
    the run's train, valid and test rows (a later split's row is the more recent history)."""
    histories = torch.zeros(n_users, max_len, dtype=torch.long)
    lengths = torch.zeros(n_users, dtype=torch.long)
    pair_users, pair_items = [], []
    for data in splits:
        feat = data.inter_feat
        users, targets = feat[data.uid_field].numpy(), feat[data.iid_field].numpy()
        pair_users.append(users)
        pair_items.append(targets)
        list_field = getattr(data, "item_id_list_field", None)
        if list_field is None or list_field not in feat:
            continue
        lists, sizes = feat[list_field].numpy(), feat[data.item_list_length_field].numpy()
        pair_users.append(np.repeat(users, lists.shape[1]))
        pair_items.append(lists.reshape(-1))
        _, last = np.unique(users[::-1], return_index=True)  # each user's last row
        for row in len(users) - 1 - last:
            items = np.append(lists[row, : sizes[row]], targets[row])[-max_len:]
            histories[users[row]] = 0
            histories[users[row], : len(items)] = torch.from_numpy(items)
            lengths[users[row]] = len(items)
    users, items = np.concatenate(pair_users), np.concatenate(pair_items)
    keep = items > 0
    indptr, indices = seen_csr(n_users, users[keep].astype(np.int64), items[keep].astype(np.int64))
    return histories, lengths, indptr, indices


class Recommender(TokenRecommender):
    """Top-k by token from the full model: ``model.full_sort_predict`` on the users' histories (PerPEFT: each
    known user under its own group, a new one under the group its grouping assigns, as ``PerPEFT.recommend``)."""

    def __init__(self, run: TrainedRun, batch_size: int = 256):
        self.run, self.model, self.batch_size = run, run.model, batch_size
        data = run.dataset
        self.item_tokens = [str(t) for t in data.field2id_token[data.iid_field]]
        self.user_tokens = [str(t) for t in data.field2id_token[data.uid_field]]
        self._index()
        self.sequential = getattr(data, "item_id_list_field", None) is not None and hasattr(self.model, "ITEM_SEQ")
        self.max_seq_length = int(run.config["MAX_ITEM_LIST_LENGTH"]) if self.sequential else 1
        self.histories, self.lengths, self.seen_indptr, self.seen_indices = known_users(
            run.splits, len(self.user_tokens), self.max_seq_length)  # fmt: skip
        self.grouped = hasattr(self.model, "interest_vectors") and hasattr(self.model, "group_of_user")
        from recbole_perpeft.model.personalisation import PersonalisedGlobalPEFT

        backbone = getattr(self.model, "backbone_name", "SASRec")
        # (the personal-vector baselines read a vector per known user or group: none for a new user)
        personal = isinstance(self.model, PersonalisedGlobalPEFT)
        self.serves_new_users = self.sequential and backbone == "SASRec" and not personal

    def resolve(self, user=None, history=None) -> Request:
        request = super().resolve(user, history)
        if request.history and not self.serves_new_users:
            raise ValueError(f"{self.run.model_name} scores only the users it was trained on (by their user token), "
                             "not a history.")  # fmt: skip
        return request

    def score(self, users, seqs, lengths, stored=None):
        from recbole.data.interaction import Interaction

        model, device = self.model, self.run.config["device"]
        fields = {model.USER_ID: users}
        if self.sequential:
            fields.update({model.ITEM_SEQ: seqs, model.ITEM_SEQ_LEN: lengths.clamp(min=1)})
        batch = Interaction(fields).to(device)
        if not self.grouped:  # (RecBole's general models return the scores flat)
            return model.full_sort_predict(batch).view(len(users), -1), None
        group_of_user = model.group_of_user.cpu()
        known = (users > 0) & (group_of_user[users] >= 0)  # (a user left out of the grouping is served as new)
        scores = torch.empty(len(users), len(self.item_tokens), device=device)
        groups = torch.full((len(users),), -1, dtype=torch.long)
        if known.any():
            rows = torch.nonzero(known).flatten()
            scores[rows.to(device)] = model.full_sort_predict(batch[rows.to(device)])
            soft = getattr(model, "soft_group_of_user", None)
            groups[rows] = (soft[:, 0].cpu() if soft is not None else group_of_user)[users[rows]]
        if not known.all():
            rows = torch.nonzero(~known).flatten()
            scores[rows.to(device)], groups[rows] = self._new_user_scores(batch[rows.to(device)], seqs[rows],
                                                                          lengths[rows])  # fmt: skip
        return scores, groups

    def _new_user_scores(self, batch, seqs, lengths):
        """PerPEFT.recommend's rule for a batch: interest on the global path, the grouping's assignment."""
        model, device = self.model, self.run.config["device"]
        interest = model.interest_vectors(seqs, lengths).cpu().numpy().astype(np.float32)
        groups = model.user_groups
        if model.soft_groups > 1:
            top, weights = groups.assign_soft(interest, model.soft_groups, model.soft_group_weighting,
                                              model.soft_group_temperature)  # fmt: skip
            scores = model.mixed_scores(batch, torch.from_numpy(top).to(device), torch.from_numpy(weights).to(device))
            return scores, torch.from_numpy(top[:, 0])
        if groups.method == "random":  # (drawn per user, as the model assigns one at a time)
            assigned = np.concatenate([groups.assign(v[None]) for v in interest])
        else:
            assigned = groups.assign(interest)
        assigned = torch.from_numpy(assigned)
        scores = torch.empty(len(assigned), len(self.item_tokens), device=device)
        for group in assigned.unique().tolist():
            rows = torch.nonzero(assigned == group).flatten().to(device)
            scores[rows] = model.scores(batch[rows], group)
        return scores, assigned
