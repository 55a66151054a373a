"""PerPEFT's two stages (paper §3.3): train GlobalPEFT, group users by interest, train PerPEFT.

Stage 1 trains GlobalPEFT for ``stage1_epochs`` (or loads ``global_checkpoint``) and keeps its best
validation checkpoint. Users are grouped on interest vectors = SASRec's output at the last position
of each user's training sequence under that model (no valid/test item enters). Stage 2 builds
PerPEFT from it and trains ``stage2_epochs`` on group-homogeneous batches with group negatives,
keeping the best validation checkpoint. A run killed in either stage resumes with ``--resume`` on
that stage's checkpoint (the stage is read from the checkpoint)."""

from __future__ import annotations

import copy
import os
from logging import getLogger
from time import time

import numpy as np
import torch
from recbole.utils import get_local_time

from recbole_perpeft.data.dataloader import GroupedUserSequenceDataLoader, user_sequences
from recbole_perpeft.data.sampler import GroupNegativeSampler, SequenceNegativeSampler
from recbole_perpeft.grouping import UserGroups, fit_user_groups, training_item_pools
from recbole_perpeft.model.sequential_recommender.globalpeft import GlobalPEFT
from recbole_perpeft.model.sequential_recommender.perpeft import PerPEFT
from recbole_perpeft.trainer import PEFTTrainer
from recbole_perpeft.utils import trainable_parameters_by_component


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
    return torch.load(path, map_location="cpu", weights_only=True)["config"]["model"]


def groups_file(stage2_checkpoint: str) -> str:
    return os.path.splitext(stage2_checkpoint)[0] + "-groups.pt"


class PerPEFTRun:
    def __init__(self, config, train_data, valid_data, test_data, saved=True):
        self.config, self.saved = config, saved
        self.train_data, self.valid_data, self.test_data = train_data, valid_data, test_data
        self.train_dataset = train_data._dataset
        self.logger = getLogger()
        self.device = config["device"]
        stamp = get_local_time()
        self.stage1_file = os.path.join(config["checkpoint_dir"], f"PerPEFT-stage1-GlobalPEFT-{stamp}.pth")
        self.stage2_file = os.path.join(config["checkpoint_dir"], f"PerPEFT-stage2-{stamp}.pth")
        self.seconds = {}

    # --- stage 1 -------------------------------------------------------------------------------------

    def stage1(self, resume: str | None) -> GlobalPEFT:
        config = stage_config(self.config, "GlobalPEFT", self.config["stage1_epochs"])
        model = GlobalPEFT(config, self.train_dataset).to(self.device)
        source = self.config["global_checkpoint"]
        if source and not resume:
            self.logger.info(f"Stage 1: GlobalPEFT from {source} (not retrained).")
            model.load_state_dict(torch.load(source, map_location=self.device, weights_only=True)["state_dict"])
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
        state = torch.load(trainer.saved_model_file, map_location=self.device, weights_only=True)["state_dict"]
        model.load_state_dict(state)
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

    def stage2(self, global_model: GlobalPEFT, groups: UserGroups, resume: str | None):
        config = stage_config(self.config, "PerPEFT", self.config["stage2_epochs"])
        config["n_groups"] = groups.n_groups
        model = PerPEFT(config, self.train_dataset).to(self.device)
        model.load_global(global_model.state_dict(), groups)
        del global_model
        n_items, seed = self.train_dataset.item_num, config["seed"]
        if config["group_negatives"]:
            sampler = GroupNegativeSampler(n_items, seed, training_item_pools(self.train_dataset, groups))
        else:
            sampler = SequenceNegativeSampler(n_items, seed)
        train_data = GroupedUserSequenceDataLoader(config, self.train_dataset, sampler, groups.labels,
                                                   shuffle=config["shuffle"])
        trainer = PEFTTrainer(config, model)
        trainer.saved_model_file = resume or self.stage2_file
        torch.save(groups.to_state(), groups_file(trainer.saved_model_file))
        if resume:
            trainer.resume_checkpoint(resume)
        self.logger.info(f"Stage 2: PerPEFT, {config['epochs']} epochs -> {trainer.saved_model_file}")
        start = time()
        best_score, best_valid = trainer.fit(train_data, self.valid_data, saved=self.saved,
                                             show_progress=config["show_progress"])
        self.seconds["stage2_train"], self.seconds["stage2_per_epoch"] = time() - start, trainer.epoch_seconds
        start = time()
        test_result = trainer.evaluate(self.test_data, load_best_model=self.saved,
                                       show_progress=config["show_progress"])
        self.seconds["eval"] = time() - start
        return model, trainer, best_score, best_valid, test_result

    def run(self, resume: str | None = None) -> dict:
        stage = checkpoint_stage(resume) if resume else None
        if stage == "PerPEFT":
            groups = UserGroups.from_state(torch.load(groups_file(resume), weights_only=True))
            global_model = GlobalPEFT(stage_config(self.config, "GlobalPEFT", 0), self.train_dataset).to(self.device)
            self.global_checkpoint = None  # the stage-2 checkpoint holds the global path too
        else:
            global_model = self.stage1(resume if stage == "GlobalPEFT" else None)
            groups = self.group_users(global_model)
        model, trainer, best_score, best_valid, test_result = self.stage2(
            global_model, groups, resume if stage == "PerPEFT" else None
        )
        parameters = trainable_parameters_by_component(model)
        parameters["per_group"] = {
            "peft_adapter": parameters["group_specific/peft_adapters"] // groups.n_groups,
            "projector": parameters["group_specific/projectors"] // groups.n_groups,
        }
        self.logger.info(f"PerPEFT parameters (Table 8 split): {parameters}")
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
        }
