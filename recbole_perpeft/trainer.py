"""RecBole's Trainer for models with a frozen foundation model inside."""

from __future__ import annotations

from time import time

from recbole.trainer import Trainer

from recbole_perpeft.compat import SafeCheckpointMixin


class PEFTTrainer(SafeCheckpointMixin, Trainer):
    """Optimises only trainable parameters (the foundation's frozen ones would only cost AdamW
    memory) and records seconds per training epoch."""

    def __init__(self, config, model):
        self.epoch_seconds: list[float] = []
        super().__init__(config, model)

    def _build_optimizer(self, **kwargs):
        kwargs.setdefault("params", [p for p in self.model.parameters() if p.requires_grad])
        return super()._build_optimizer(**kwargs)

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        start = time()
        loss = super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)
        self.epoch_seconds.append(time() - start)
        return loss
