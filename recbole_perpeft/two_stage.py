"""Two stages for models personalised by interest group (PerPEFT, paper §3.3, and the group-level
baselines): train GlobalPEFT, group users by interest, train the grouped model.

Stage 1 trains GlobalPEFT for ``stage1_epochs`` (or loads ``global_checkpoint``) and keeps its best
validation checkpoint. Users are grouped on interest vectors = SASRec's output at the last position
of each user's training sequence under that model (no valid/test item enters). Stage 2 builds the
grouped model from it (``load_global``) and trains ``stage2_epochs`` on group-homogeneous batches
(negatives from the group's items if ``group_negatives``), keeping the best validation checkpoint.
A run killed in either stage resumes with ``--resume`` on that stage's checkpoint (the stage is read
from the checkpoint)."""

from __future__ import annotations

import copy
import os
from logging import getLogger
from time import time

import numpy as np
import torch

from recbole_perpeft.data.dataloader import GroupedUserSequenceDataLoader, user_sequences
from recbole_perpeft.data.sampler import GroupNegativeSampler, SequenceNegativeSampler
from recbole_perpeft.grouping import UserGroups, check_grouping, fit_user_groups, training_item_pools
from recbole_perpeft.model.sequential_recommender.globalpeft import GlobalPEFT
from recbole_perpeft.resume import TrainingInterrupted, best_checkpoint_path, load_checkpoint
from recbole_perpeft.trainer import PEFTTrainer, checkpoint_path
from recbole_perpeft.utils import get_model, trainable_parameters_by_component


def stage_config(config, model: str, epochs: int):
    """A copy of the run's config for one stage (RecBole's trainer reads model and epochs from it)."""
    staged = copy.copy(config)
    staged.final_config_dict = dict(config.final_config_dict, model=model, epochs=epochs)
    return staged


def training_histories(train_dataset, max_len: int):
    """Each user's last ``max_len`` training items (oldest first) and their count."""
    users = user_sequences(train_dataset)
    seq = users[train_dataset.item_id_list_field]
    lengths = users[train_dataset.item_list_length_field]
    full = torch.cat([seq[:, :1], users["target_item_list"]], dim=1)  # first item + next items = all
    n_full = lengths + 1
    start = (n_full - max_len).clamp(min=0)
    index = start.unsqueeze(1) + torch.arange(max_len)
    valid = index < n_full.unsqueeze(1)
    histories = full.gather(1, index.clamp(max=full.shape[1] - 1)) * valid
    return users[train_dataset.uid_field], histories, n_full.clamp(max=max_len)


@torch.no_grad()
def interest_vectors(model: GlobalPEFT, user_ids, histories, lengths, batch_size: int) -> np.ndarray:
    model.eval()
    table = model.item_table()
    rows = [
        model.forward(h, n, table).cpu()
        for h, n in zip(histories.split(batch_size), lengths.split(batch_size), strict=True)
    ]
    return torch.cat(rows).numpy()


def checkpoint_stage(path: str) -> str:
    return load_checkpoint(path)["config"]["model"]


def groups_file(stage2_checkpoint: str) -> str:
    return os.path.splitext(stage2_checkpoint)[0] + "-groups.pt"


class TwoStageRun:
    def __init__(self, config, train_data, valid_data, test_data, saved=True):
        self.config, self.saved = config, saved
        self.train_data, self.valid_data, self.test_data = train_data, valid_data, test_data
        self.train_dataset = train_data._dataset
        self.logger = getLogger()
        self.device = config["device"]
        self.model_name = config["model"]
        self.model_class = get_model(self.model_name)
        self.stage1_file = checkpoint_path(config, f"{self.model_name}-stage1-GlobalPEFT")
        self.stage2_file = checkpoint_path(config, f"{self.model_name}-stage2")
        self.seconds = {}
        self.global_checkpoint = None  # set by stage 1 (or read back when stage 2 resumes)
        # Settings that would only fail after stage 1 has trained are checked now.
        n_users = len(np.unique(self.train_dataset.inter_feat[self.train_dataset.uid_field].numpy()))
        check_grouping(config["n_groups"], config["grouping_method"], n_users)
        for key in ("stage1_epochs", "stage2_epochs"):
            if isinstance(config[key], bool) or not isinstance(config[key], int) or config[key] < 0:
                raise ValueError(f"{key} must be a non-negative integer, got {config[key]!r}.")

    # --- stage 1 -------------------------------------------------------------------------------------

    def stage1(self, resume: str | None) -> GlobalPEFT:
        config = stage_config(self.config, "GlobalPEFT", self.config["stage1_epochs"])
        model = GlobalPEFT(config, self.train_dataset).to(self.device)
        source = self.config["global_checkpoint"]
        if source and not resume:
            self.logger.info(f"Stage 1: GlobalPEFT from {source} (not retrained).")
            model.load_state_dict(load_checkpoint(source, map_location=self.device)["state_dict"])
            self.global_checkpoint = source
            return model
        trainer = PEFTTrainer(config, model)
        trainer.saved_model_file = resume or self.stage1_file
        if resume:
            trainer.resume_checkpoint(resume)
        self.logger.info(f"Stage 1: GlobalPEFT, {config['epochs']} epochs -> {trainer.saved_model_file}")
        start = time()
        trainer.fit(self.train_data, self.valid_data, saved=True, show_progress=config["show_progress"])
        self.seconds["stage1_train"], self.seconds["stage1_per_epoch"] = time() - start, trainer.epoch_seconds
        model.load_state_dict(load_checkpoint(trainer.saved_model_file, map_location=self.device)["state_dict"])
        self.global_checkpoint = trainer.saved_model_file
        return model

    def group_users(self, model: GlobalPEFT) -> UserGroups:
        config = self.config
        user_ids, histories, lengths = training_histories(self.train_dataset, model.max_seq_length)
        vectors = interest_vectors(model, user_ids.to(self.device), histories.to(self.device),
                                   lengths.to(self.device), config["eval_batch_size"])
        groups = fit_user_groups(vectors, user_ids.numpy(), self.train_dataset.user_num, config["n_groups"],
                                 config["grouping_method"], config["seed"])
        return groups

    # --- stage 2 -------------------------------------------------------------------------------------

    def stage2(self, global_state: dict, groups: UserGroups, resume: str | None, weight_decay=None):
        config = stage_config(self.config, self.model_name, self.config["stage2_epochs"])
        config["n_groups"] = groups.n_groups
        if weight_decay is not None:
            config["weight_decay"] = weight_decay
        model = self.model_class(config, self.train_dataset).to(self.device)
        model.load_global(global_state, groups)
        n_items, seed = self.train_dataset.item_num, config["seed"]
        if config["group_negatives"]:
            sampler = GroupNegativeSampler(n_items, seed, training_item_pools(self.train_dataset, groups))
        else:
            sampler = SequenceNegativeSampler(n_items, seed)
        train_data = GroupedUserSequenceDataLoader(config, self.train_dataset, sampler, groups.labels,
                                                   shuffle=config["shuffle"])
        trainer = PEFTTrainer(config, model)
        suffix = "" if weight_decay is None else f"-wd{weight_decay:g}"
        trainer.saved_model_file = resume or self.stage2_file.replace(".pth", f"{suffix}.pth")
        # Beside the grouping, what stage 1 reported: a resumed stage 2 still writes a complete result.
        stage1 = {"seconds": dict(self.seconds), "global_checkpoint": self.global_checkpoint}
        torch.save({**groups.to_state(), "stage1": stage1}, groups_file(trainer.saved_model_file))
        if resume:
            trainer.resume_checkpoint(resume)
        self.logger.info(
            f"Stage 2: {self.model_name}, {config['epochs']} epochs, weight_decay {config['weight_decay']} "
            f"-> {trainer.saved_model_file}"
        )
        start = time()
        try:
            best_score, best_valid = trainer.fit(train_data, self.valid_data, saved=self.saved,
                                                 show_progress=config["show_progress"])
        except TrainingInterrupted as stop:
            # Before stage 2's first epoch ended, the stage-1 checkpoint is where to go on from.
            raise TrainingInterrupted(stop.checkpoint or self.global_checkpoint) from None
        seconds = {"stage2_train": time() - start, "stage2_per_epoch": trainer.epoch_seconds}
        return model, trainer, best_score, best_valid, seconds

    def tuned_stage2(self, global_state: dict, groups: UserGroups):
        """Stage 2 once per ``weight_decay_grid`` value (the paper's tuning); the best validation wins."""
        grid = self.config["weight_decay_grid"]
        bigger = self.config["valid_metric_bigger"]
        best, tried = None, {}
        for weight_decay in grid:
            outcome = self.stage2(global_state, groups, None, weight_decay=float(weight_decay))
            tried[str(weight_decay)] = outcome[3]
            better = best is None or (outcome[2] > best[2] if bigger else outcome[2] < best[2])
            if better:
                best = (*outcome, float(weight_decay))
        self.logger.info(f"weight_decay_grid: valid results {tried}; chose weight_decay={best[5]}")
        self.tuning = {"weight_decay": best[5], "valid_by_weight_decay": tried}
        return best[:5]

    def run(self, resume: str | None = None) -> dict:
        stage = checkpoint_stage(resume) if resume else None
        if stage not in (None, "GlobalPEFT", self.model_name):
            raise ValueError(f"--resume={resume} is a {stage} checkpoint, not one of {self.model_name}'s two stages.")
        if stage == self.model_name:
            saved = torch.load(groups_file(best_checkpoint_path(resume)), weights_only=True)
            groups = UserGroups.from_state(saved)
            global_model = GlobalPEFT(stage_config(self.config, "GlobalPEFT", 0), self.train_dataset).to(self.device)
            stage1 = saved.get("stage1", {"seconds": {}, "global_checkpoint": None})
            self.seconds.update(stage1["seconds"])
            self.global_checkpoint = stage1["global_checkpoint"]  # (the stage-2 checkpoint holds the global path too)
        else:
            global_model = self.stage1(resume if stage == "GlobalPEFT" else None)
            groups = self.group_users(global_model)
        global_state = global_model.state_dict()
        del global_model
        self.tuning = None
        if self.config["weight_decay_grid"] and stage != self.model_name:
            model, trainer, best_score, best_valid, seconds = self.tuned_stage2(global_state, groups)
        else:
            model, trainer, best_score, best_valid, seconds = self.stage2(
                global_state, groups, resume if stage == self.model_name else None
            )
        self.seconds.update(seconds)
        start = time()
        test_result = trainer.evaluate(self.test_data, load_best_model=self.saved,
                                       show_progress=self.config["show_progress"])
        self.seconds["eval"] = time() - start
        parameters = trainable_parameters_by_component(model)
        # group_specific/<parts> counts C copies; per_group/<part> is one group's share.
        per_group = {
            k.split("/")[1].removesuffix("s"): n // groups.n_groups
            for k, n in parameters.items()
            if k.startswith("group_specific/")
        }
        if per_group:
            parameters["per_group"] = per_group
        self.logger.info(f"{self.model_name} parameters (Table 8 split): {parameters}")
        return {
            "best_valid_score": best_score,
            "best_valid_result": best_valid,
            "test_result": test_result,
            "groups": {"method": groups.method, "n_groups": groups.n_groups, "sizes": groups.sizes()},
            "trainable_parameters": parameters,
            "seconds": self.seconds,
            "checkpoint": trainer.saved_model_file if self.saved else None,
            "global_checkpoint": self.global_checkpoint,
            "groups_file": groups_file(trainer.saved_model_file),
            "weight_decay_tuning": self.tuning,
        }
