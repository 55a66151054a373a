"""RecBole's Trainer for models with a frozen foundation model inside."""

from __future__ import annotations

import os

from recbole.trainer import Trainer
from recbole.utils import get_local_time

from recbole_perpeft.compat import AbstractTrainerWithoutDDP, SafeCheckpointMixin
from recbole_perpeft.config_values import option
from recbole_perpeft.distributed import on_rank0
from recbole_perpeft.resume import ResumableTrainerMixin


class PEFTTrainer(ResumableTrainerMixin, SafeCheckpointMixin, Trainer, AbstractTrainerWithoutDDP):
    """Optimises only trainable parameters (the foundation's frozen ones would only cost AdamW
    memory); resumable (recbole_perpeft/resume.py), with seconds per training epoch; in several
    processes, as recbole_perpeft/distributed.py says (``AbstractTrainerWithoutDDP``: no DDP wrapper)."""

    def __init__(self, config, model):
        super().__init__(config, model)
        # fp16 autocast on the adapted encoders (precision: fp16, CUDA only) needs loss scaling, or small
        # adapter gradients underflow; RecBole's own GradScaler does it when enable_scaler is on.
        precision = getattr(getattr(model, "item_tower", None), "precision", None)
        if precision is not None and precision.name == "fp16" and self.device.type == "cuda":
            self.enable_scaler = True

    def _build_optimizer(self, **kwargs):
        kwargs.setdefault("params", trainable_parameter_groups(self.model, self.config, self.logger))
        return super()._build_optimizer(**kwargs)


def trainable_parameter_groups(model, config, logger=None) -> list:
    """The trainable parameters, as one group; with ``adapter_learning_rate`` set, two: the adapter's (peft
    method or side network, every group's under PerPEFT) at that rate, the rest (projector, ID embeddings,
    recommender) at ``learning_rate``. A model without a trainable adapter (FrozenMM, ID-only) has one."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    adapter_lr = option(config, "adapter_learning_rate")
    if adapter_lr is not None and (isinstance(adapter_lr, bool) or not isinstance(adapter_lr, (int, float))
                                   or adapter_lr <= 0):  # fmt: skip
        raise ValueError(f"adapter_learning_rate must be a positive number or ~ (= learning_rate), got {adapter_lr!r}.")
    tower = getattr(model, "item_tower", None)
    if adapter_lr is None or tower is None:
        return trainable
    adapter_ids = {id(p) for p in tower.adapter_module().parameters() if p.requires_grad}
    adapter = [p for p in trainable if id(p) in adapter_ids]
    if not adapter:
        return trainable
    rest = [p for p in trainable if id(p) not in adapter_ids]
    if logger is not None:
        logger.info(
            f"adapter_learning_rate {adapter_lr} for the adapter's {sum(p.numel() for p in adapter):,} parameters, "
            f"learning_rate {config['learning_rate']} for the other {sum(p.numel() for p in rest):,}"
        )
    return [{"params": adapter, "lr": float(adapter_lr)}, {"params": rest}]


def checkpoint_path(config, name: str) -> str:
    """``<checkpoint_dir>/<name>-<dataset>-seed<seed>-<time>.pth``, never an existing file: RecBole's
    own names are unique only to the second, so back-to-back runs (a comparison) could share one.
    In several processes, rank 0's name (its clock, its files) for every rank."""
    return on_rank0(_new_checkpoint_path, config, name)


def _new_checkpoint_path(config, name: str) -> str:
    os.makedirs(config["checkpoint_dir"], exist_ok=True)
    stem = os.path.join(config["checkpoint_dir"], f"{name}-{config['dataset']}-seed{config['seed']}-{get_local_time()}")
    path, n = f"{stem}.pth", 1
    while os.path.exists(path):
        path, n = f"{stem}-{n}.pth", n + 1
    return path
