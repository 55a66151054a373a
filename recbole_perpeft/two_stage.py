"""The trainer of models personalised by interest group (PerPEFT, paper §3.3, the group-level
baselines and SharedGroupPEFT): train GlobalPEFT, group users by interest, train the grouped model.

Like RecBole-GNN's NCLTrainer, which clusters inside ``fit``, the special loop is a trainer: the
registry gives it to every model that sets ``trainer_class = TwoStageTrainer``, so ``quick_start`` and
``compare`` run these models like any other.

``fit`` runs stage 1 (GlobalPEFT for ``stage1_epochs``, or loads ``global_checkpoint``) and keeps its
best validation checkpoint. Users are grouped on interest vectors: the backbone's user vectors under
that model from training data only (SASRec: its output at the last position of each user's training
sequence; LightGCN: the propagated user vector). The grouped model is then initialised from it
(``load_global``) and trained ``stage2_epochs`` on group-homogeneous batches (negatives from the
group's items if ``group_negatives``), keeping the best validation checkpoint. A run killed in either
stage resumes with ``--resume`` on that stage's checkpoint (the stage is read from the checkpoint)."""

from __future__ import annotations

import copy
import os
from time import time

import numpy as np
import torch

from recbole_perpeft.data.sampler import GroupNegativeSampler, SequenceNegativeSampler
from recbole_perpeft.distributed import build_item_tables, on_rank0, rank, single_process_view
from recbole_perpeft.grouping import UserGroups, fit_user_groups, grouping_source, training_item_pools
from recbole_perpeft.resume import TrainingInterrupted, best_checkpoint_path, load_checkpoint
from recbole_perpeft.trainer import PEFTTrainer, checkpoint_path
from recbole_perpeft.utils import trainable_parameters_by_component

STAGE1_MODEL = "GlobalPEFT"


def stage_config(config, model: str, epochs: int, **overrides):
    """A copy of the run's config for one stage (RecBole's trainer reads model and epochs from it)."""
    staged = copy.copy(config)
    staged.final_config_dict = dict(config.final_config_dict, model=model, epochs=epochs, **overrides)
    return staged


def checkpoint_stage(path: str) -> str:
    return load_checkpoint(path)["config"]["model"]


def groups_file(stage2_checkpoint: str) -> str:
    return os.path.splitext(stage2_checkpoint)[0] + "-groups.pt"


def group_users(model, dataset, config, valid_dataset=None) -> UserGroups:
    """The interest groups of every training user under a trained GlobalPEFT (in eval mode). In several
    processes every rank helps build the item table, and rank 0 groups the users for all (K-Means may
    differ in the last bits from machine to machine; every rank must hold the same groups)."""
    model.eval()
    build_item_tables(model)  # (one process: nothing; item_table below builds it)

    @torch.no_grad()
    def fit() -> UserGroups:
        # grouping_sequence train_valid: the validation items too (the official code's; valid_dataset given)
        user_ids, vectors = model.backbone.interest_vectors(dataset, model.item_table(), config["eval_batch_size"],
                                                            valid_dataset)  # fmt: skip
        return fit_user_groups(vectors, np.asarray(user_ids), dataset.user_num, config["n_groups"],
                               config["grouping_method"], config["seed"])  # fmt: skip

    return on_rank0(fit)


class TwoStageTrainer(PEFTTrainer):
    """``self.model`` is the grouped (stage-2) model; stage 1 trains its own GlobalPEFT.

    After ``fit``, ``extra_result`` holds what the run reports beside RecBole's results: the groups,
    the global checkpoint, the groups file, seconds per stage, the weight-decay tuning and the
    per-group parameter split (paper Table 8)."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.stage1_file = None
        self.global_checkpoint = None
        self.groups = None
        self.seconds = {}
        self.tuning = None
        self._stage2_resume = False
        self._stage1_resume = None
        self._global_state = None
        for key in ("stage1_epochs", "stage2_epochs"):
            if isinstance(config[key], bool) or not isinstance(config[key], int) or config[key] < 0:
                raise ValueError(f"{key} must be a non-negative integer, got {config[key]!r}.")
        self.epochs = config["stage2_epochs"]

    @property
    def extra_result(self) -> dict:
        groups = self.groups
        parameters = trainable_parameters_by_component(self.model)
        # group_specific/<parts> counts C copies; per_group/<part> is one group's share.
        per_group = {
            k.split("/")[1].removesuffix("s"): n // groups.n_groups
            for k, n in parameters.items()
            if k.startswith("group_specific/")
        }
        if per_group:
            parameters["per_group"] = per_group
        return {
            "groups": {"method": groups.method, "n_groups": groups.n_groups, "sizes": groups.sizes()},
            "trainable_parameters": parameters,
            "seconds": dict(self.seconds),
            "global_checkpoint": self.global_checkpoint and os.path.abspath(self.global_checkpoint),
            "groups_file": os.path.abspath(groups_file(self.saved_model_file)),
            "weight_decay_tuning": self.tuning,
        }

    # --- resume: the stage is read from the checkpoint -----------------------------------------------------

    def resume_checkpoint(self, resume_file):
        resume_file = str(resume_file)
        stage = checkpoint_stage(resume_file)
        if stage == STAGE1_MODEL:
            self._stage1_resume = resume_file
            self.saved_model_file = checkpoint_path(self.config, self.config["model"])
            return
        if stage != self.config["model"]:
            raise ValueError(
                f"--resume={resume_file} is a {stage} checkpoint, not one of {self.config['model']}'s two stages."
            )
        saved = on_rank0(torch.load, groups_file(best_checkpoint_path(resume_file)), weights_only=True)
        self.groups = UserGroups.from_state(saved)
        stage1 = saved.get("stage1", {"seconds": {}, "global_checkpoint": None})
        self.seconds.update(stage1["seconds"])
        self.global_checkpoint = stage1["global_checkpoint"]  # (the stage-2 checkpoint holds the global path too)
        self.model.set_groups(self.groups)
        super().resume_checkpoint(resume_file)
        self._stage2_resume = True

    # --- the two stages ------------------------------------------------------------------------------------

    def stage1(self, train_data, valid_data, show_progress):
        """A trained GlobalPEFT: its best validation checkpoint, or the given ``global_checkpoint``."""
        from recbole_perpeft.model.sequential_recommender.globalpeft import GlobalPEFT

        config = stage_config(self.config, STAGE1_MODEL, self.config["stage1_epochs"])
        model = GlobalPEFT(config, train_data._dataset).to(self.device)
        source = self.config["global_checkpoint"]
        if source and not self._stage1_resume:
            self.logger.info(f"Stage 1: GlobalPEFT from {source} (not retrained).")
            model.load_state_dict(load_checkpoint(source, map_location=self.device)["state_dict"])
            self.global_checkpoint = source
            return model
        trainer = PEFTTrainer(config, model)
        stem = os.path.splitext(self.saved_model_file)[0]
        trainer.saved_model_file = self._stage1_resume or f"{stem}-stage1-{STAGE1_MODEL}.pth"
        if self._stage1_resume:
            trainer.resume_checkpoint(self._stage1_resume)
        self.logger.info(f"Stage 1: GlobalPEFT, {config['epochs']} epochs -> {trainer.saved_model_file}")
        start = time()
        trainer.fit(train_data, valid_data, saved=True, show_progress=show_progress)
        self.seconds["stage1_train"], self.seconds["stage1_per_epoch"] = time() - start, trainer.epoch_seconds
        # grouping_checkpoint last (the official code's): the last epoch's weights, from the -last checkpoint fit
        # wrote, which is then also the global_checkpoint a comparison's later grouped rows start from.
        last = grouping_source(self.config)[1] == "last"
        self.global_checkpoint = trainer.last_model_file if last else trainer.saved_model_file
        model.load_state_dict(load_checkpoint(self.global_checkpoint, map_location=self.device)["state_dict"])
        return model

    def stage2_loader(self, dataset):
        """Group-homogeneous batches from the backbone, negatives from the group's items (§3.3.4); in several
        processes, the global batches (every rank builds the same loader and trains on its share)."""
        config, groups = single_process_view(self.config), self.groups
        if config["group_negatives"]:
            sampler = GroupNegativeSampler(dataset.item_num, config["seed"], training_item_pools(dataset, groups))
        else:
            sampler = SequenceNegativeSampler(dataset.item_num, config["seed"])
        return self.model.backbone.training_loader(config, dataset, sampler, groups.labels, shuffle=config["shuffle"])

    def _restart_stage2(self, weight_decay: float, saved_model_file: str) -> None:
        """Fresh training state for one more stage-2 run (one value of ``weight_decay_grid``)."""
        self.start_epoch, self.cur_step = 0, 0
        self.best_valid_score = -np.inf if self.valid_metric_bigger else np.inf
        self.best_valid_result = None
        self.epoch_seconds, self.stopped_early = [], False
        self.weight_decay = weight_decay
        self.optimizer = self._build_optimizer(weight_decay=weight_decay)
        self.saved_model_file = saved_model_file

    def prepare_stage2(self, global_state: dict, groups: UserGroups) -> None:
        """Start stage 2 from a trained GlobalPEFT's state and its grouping (``fit`` then trains stage 2
        only; it calls this itself after stage 1)."""
        self._global_state, self.groups = global_state, groups
        self.model.load_global(global_state, groups)

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        dataset = train_data._dataset
        if not self._stage2_resume and self._global_state is None:
            # (n_groups and grouping_method were checked when the model was built: TwoStageGrouped.)
            global_model = self.stage1(train_data, valid_data, show_progress)
            with_valid = grouping_source(self.config)[0] == "train_valid" and valid_data is not None
            groups = group_users(global_model, dataset, self.config, valid_data._dataset if with_valid else None)
            global_state = global_model.state_dict()
            del global_model
            self.prepare_stage2(global_state, groups)
        stage2_data = self.stage2_loader(dataset)
        stage1 = {"seconds": dict(self.seconds), "global_checkpoint": self.global_checkpoint}
        grid = self.config["weight_decay_grid"] if not self._stage2_resume else None
        runs = [(None, self.saved_model_file)] if not grid else [
            (float(wd), self.saved_model_file.replace(".pth", f"-wd{float(wd):g}.pth")) for wd in grid
        ]  # fmt: skip
        best, tried = None, {}
        for weight_decay, file in runs:
            if weight_decay is not None:
                self.model.load_global(self._global_state, self.groups)
                self._restart_stage2(weight_decay, file)
            # Beside the grouping, what stage 1 reported: a resumed stage 2 still writes a complete result.
            if rank() == 0:
                torch.save({**self.groups.to_state(), "stage1": stage1}, groups_file(self.saved_model_file))
            self.logger.info(
                f"Stage 2: {self.config['model']}, {self.epochs} epochs, weight_decay {self.weight_decay} "
                f"-> {self.saved_model_file}"
            )
            start = time()
            try:
                score, result = super().fit(stage2_data, valid_data, verbose=verbose, saved=saved,
                                            show_progress=show_progress, callback_fn=callback_fn)  # fmt: skip
            except TrainingInterrupted as stop:
                # Before stage 2's first epoch ended, the stage-1 checkpoint is where to go on from.
                raise TrainingInterrupted(stop.checkpoint or self.global_checkpoint) from None
            self.seconds.update(stage2_train=time() - start, stage2_per_epoch=list(self.epoch_seconds))
            tried[str(weight_decay)] = result
            bigger = self.valid_metric_bigger
            if best is None or (score > best[0] if bigger else score < best[0]):
                best = (score, result, weight_decay, file, dict(self.seconds))
        if grid:
            score, result, weight_decay, file, seconds = best
            self.logger.info(f"weight_decay_grid: valid results {tried}; chose weight_decay={weight_decay}")
            self.tuning = {"weight_decay": weight_decay, "valid_by_weight_decay": tried}
            self.best_valid_score, self.best_valid_result, self.saved_model_file = score, result, file
            self.seconds = seconds
            if saved:  # the chosen run's best weights, for evaluate(load_best_model=True) and the caller
                self.model.load_state_dict(load_checkpoint(file, map_location=self.device)["state_dict"])
        return self.best_valid_score, self.best_valid_result
