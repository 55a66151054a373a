"""Training in several processes through torch.distributed (``--nproc``, ``--world_size``; see launch.py).

Design: every rank builds the single-process training and evaluation loaders (the same seeds, so the
same batches and negatives on every rank: ``single_process_view``), and the trainer deals each
batch out:

* Training: each global batch (``train_batch_size`` rows, group-homogeneous under PerPEFT) is cut
  into ``world_size`` contiguous row slices, one per rank (each still of one group). Each rank's loss
  is its slice's mean, scaled by the slice's share of the positions the global loss averages over
  (:func:`loss_positions`), and the gradients are summed over the ranks: the gradient of the
  single-process loss of that batch. The loaders' state (resume) is the global stream's, the same on
  every rank, so a checkpoint resumes on any world size.
* Gradients (:func:`reduce_gradients`): no ``DistributedDataParallel`` and no RecBole sync loss
  (``sum(p) * 0`` over every parameter, the frozen foundation's included). The optimizer's parameters
  are reduced by hand: first which of them got a gradient on any rank (one small all-reduce), then
  only those. A group adapter no rank used keeps ``grad = None`` everywhere, so AdamW skips it exactly
  as in one process (DDP would give it a zero gradient, and AdamW would still decay and move it); one
  used by some ranks is summed with zeros from the others. DDP's ``find_unused_parameters`` would
  need the loss computed inside the wrapped module's forward, and a pass over the autograd graph.
* Evaluation: each rank scores a contiguous share of the evaluation batches; the item tables are
  built once per evaluation, their chunks shared out among the ranks and gathered
  (:func:`build_item_tables`); the per-user rows are gathered in rank order and evaluated once
  (``compat.merge_eval_structs``): the single process's metrics.
* Dropout draws from each rank's own torch generator (seeded ``seed + rank``, as RecBole), so with
  dropout the ranks' masks differ from one process's: equal results need dropout 0.
"""

from __future__ import annotations

import copy
import random
import time
from contextlib import contextmanager
from logging import getLogger

import numpy as np
import torch
import torch.distributed as dist
from recbole.data.dataloader import FullSortEvalDataLoader
from recbole.data.interaction import Interaction
from recbole.trainer import Trainer
from recbole.utils import EvaluatorType, set_color
from torch.nn.utils.clip_grad import clip_grad_norm_
from tqdm import tqdm

from recbole_perpeft.compat import merge_eval_structs

BUCKET_ELEMENTS = 8 * 2**20  # gradients are all-reduced in flat buckets of at most this many elements
TARGET_LIST = "target_item_list"  # (data/dataloader.py's field: the next item at every position, 0 = none)


# --- the process group -------------------------------------------------------------------------------------


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def single_process_view(config):
    """A copy of ``config`` that loaders take for a single process's: every rank builds the same
    (global) loaders, and the trainer shares their batches out. (In one process: ``config``.)"""
    if config["single_spec"]:
        return config
    view = copy.copy(config)
    view.final_config_dict = dict(config.final_config_dict, single_spec=True)
    return view


@contextmanager
def rank0_first():
    """Rank 0 runs the body first (it may download a dataset, build caches), then the others, reusing
    what it wrote (each cache build also holds a lock: data/cache_files.py)."""
    if is_distributed() and rank() != 0:
        dist.barrier()
    yield
    if is_distributed() and rank() == 0:
        dist.barrier()


def broadcast_object(value=None):
    """Rank 0's ``value`` on every rank (a collective call)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank0(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` computed on rank 0 only and given to every rank (in one process: called);
    an exception there is raised on every rank, so that none waits for the others forever."""
    if not is_distributed():
        return fn(*args, **kwargs)
    outcome = None
    if rank() == 0:
        try:
            outcome = ("value", fn(*args, **kwargs))
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            outcome = ("error", err)
    kind, value = broadcast_object(outcome)
    if kind == "error":
        raise value
    return value


def gather_objects(value) -> list:
    """Every rank's ``value``, in rank order, on every rank."""
    every = [None] * world_size()
    dist.all_gather_object(every, value)
    return every


def broadcast_state(model) -> None:
    """Rank 0's values of ``model.state_dict()`` (trainable parameters and buffers; our models leave the
    frozen foundation out of it, and it is loaded from the same files everywhere) on every rank."""
    on_gpu = dist.get_backend() == "nccl"  # NCCL moves CUDA tensors only
    for value in model.state_dict().values():
        if not isinstance(value, torch.Tensor) or value.is_sparse:
            continue
        moved = value.cuda() if on_gpu and not value.is_cuda else value
        dist.broadcast(moved, src=0)
        if moved is not value:
            value.copy_(moved)


def sync_host_rng() -> None:
    """Python's and numpy's global generators of rank 0 on every rank: RecBole's own samplers draw from
    them, and every rank must draw the same global batch. (Torch's generator stays per rank: dropout.)"""
    if is_distributed():
        python, numpy = broadcast_object((random.getstate(), np.random.get_state()))
        random.setstate(python)
        np.random.set_state(numpy)


# --- Ctrl-C: every rank stops at the same training step ------------------------------------------------------

_stop = {"at": None}  # when the first Ctrl-C came
SECOND_CTRL_C_SECONDS = 2.0  # a terminal's Ctrl-C reaches a process twice (directly and from launch.py)


def request_stop(signum=None, frame=None) -> None:
    """SIGINT handler of a training process (launch.py): a Ctrl-C asks for a stop at the next training
    step, on which all ranks agree (:func:`reduce_gradients` carries the flag); another one more than
    ``SECOND_CTRL_C_SECONDS`` later stops at once."""
    if _stop["at"] is None:
        _stop["at"] = time.monotonic()
    elif time.monotonic() - _stop["at"] > SECOND_CTRL_C_SECONDS:
        raise KeyboardInterrupt


def stop_requested() -> bool:
    return _stop["at"] is not None


# --- training: a share of each batch, reduced gradients -----------------------------------------------------


def loss_positions(model, batch) -> int:
    """How many terms the loss of ``batch`` averages: the positions with a target for our sequence
    batches (plus the user position of the personal-vector models that append one, which their
    ``align`` lays out), otherwise the rows (pair batches, RecBole's batches)."""
    if TARGET_LIST not in batch:
        return len(batch)
    targets = batch[TARGET_LIST]
    align = getattr(model, "align", None)
    if callable(align):
        targets = align(targets, batch[model.ITEM_SEQ_LEN])
    return int((targets > 0).sum())


def shard_bounds(n: int, parts: int, index: int) -> tuple[int, int]:
    """[start, end) of contiguous part ``index`` of ``n`` items cut into ``parts`` (sizes differ by at most 1)."""
    size, extra = divmod(n, parts)
    start = index * size + min(index, extra)
    return start, start + size + (index < extra)


def shard_batch(batch: Interaction, model) -> tuple[Interaction, float]:
    """This rank's rows of a global batch and their share of the batch's loss. Fields with one row for the
    whole batch (e.g. shared negatives [1, K]) go whole to every rank."""
    n = len(batch)
    start, end = shard_bounds(n, world_size(), rank())
    rows = torch.arange(start, end)
    part = Interaction({k: v[rows] if v.dim() and v.shape[0] == n else v for k, v in batch.interaction.items()})
    if end == start:
        return part, 0.0
    total = loss_positions(model, batch)
    return part, loss_positions(model, part) / total if total else 0.0


def reduce_gradients(params: list, values: list[float]) -> list[float]:
    """Sum the gradients of ``params`` over the ranks, and ``values`` with them; returns the summed values.
    A parameter without a gradient on every rank keeps ``grad = None`` (see the module docstring)."""
    device = params[0].device if params else torch.device("cpu")
    head = torch.tensor([p.grad is not None for p in params] + list(values), dtype=torch.float64, device=device)
    dist.all_reduce(head)
    used = [p for p, flag in zip(params, head[: len(params)].tolist(), strict=True) if flag > 0]
    for p in used:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        elif p.grad.is_sparse:
            p.grad = p.grad.to_dense()
    bucket, size = [], 0
    for p in [*used, None]:  # None: flush the last bucket
        if p is not None and (not bucket or (p.grad.dtype == bucket[0].dtype and size < BUCKET_ELEMENTS)):
            bucket.append(p.grad)
            size += p.grad.numel()
            continue
        if bucket:
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            for grad, reduced in zip(bucket, flat.split([g.numel() for g in bucket]), strict=True):
                grad.copy_(reduced.view_as(grad))
        bucket, size = ([p.grad], p.grad.numel()) if p is not None else ([], 0)
    return head[len(params) :].tolist()


# --- evaluation: item tables built once, shared out ---------------------------------------------------------


def item_table_groups(model) -> list:
    """The item tables an evaluation of ``model`` reads: one per group for PerPEFT, else the global one."""
    n_groups = getattr(getattr(model, "item_tower", None), "n_groups", 0)
    return list(range(n_groups)) if n_groups else [None]


@torch.no_grad()
def build_item_tables(model) -> None:
    """Set the per-evaluation item tables of our models (GlobalPEFT's ``set_item_table``) for every group an
    evaluation reads: chunk i of the items (``encode_batch_size`` items, as ``item_table`` cuts them) is
    encoded by rank i mod world_size, and the chunks are gathered, so each table is computed once, in the
    same chunks as in one process. Models without that cache (RecBole's) are left alone."""
    tower = getattr(model, "item_tower", None)
    if not is_distributed() or tower is None or not hasattr(model, "set_item_table"):
        return
    device = model.item_id_embedding.weight.device
    chunks = torch.arange(model.n_items, device=device).split(tower.encode_batch_size)
    for group in item_table_groups(model):
        mine = [model.item_vectors(chunk, group).cpu() for chunk in chunks[rank() :: world_size()]]
        every = gather_objects(mine)
        ordered = [every[i % world_size()][i // world_size()] for i in range(len(chunks))]
        model.set_item_table(group, torch.cat(ordered).to(device))


# --- the trainer -------------------------------------------------------------------------------------------


class DistributedTrainerMixin:
    """Mixed into every trainer of ours before RecBole's ``Trainer`` (with
    :class:`~recbole_perpeft.compat.AbstractTrainerWithoutDDP` after it): in one process it changes
    nothing; in several, training and evaluation as the module docstring says."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.distributed = not config["single_spec"]
        if not self.distributed:
            return
        mro = type(self).__mro__
        owner = next(c for c in mro[mro.index(DistributedTrainerMixin) + 1 :] if "_train_epoch" in vars(c))
        if owner is not Trainer:
            raise ValueError(f"{config['model']} trains with {owner.__name__}, whose own training loop has no "
                             "multi-process version here: run it in one process (no --nproc / --world_size).")
        broadcast_state(self.model)  # RecBole seeds each rank with seed + rank: rank 0's initialisation wins
        if str(config["loss_type"]).upper() == "INBATCH" or (config["cmsa_weight"] or 0) > 0:
            getLogger().warning("loss_type INBATCH and cmsa_weight > 0 read the whole batch: in several processes each "
                                "rank's candidates (alignment pairs) are its share of the batch, so the result "
                                "differs from one process's.")

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        if not self.distributed:
            return super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)
        self.model.train()
        loss_func = loss_func or self.model.calculate_loss
        sync_host_rng()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.enable_scaler)
        batches = train_data
        if show_progress:
            desc = set_color(f"Train {epoch_idx:>5}", "pink")
            batches = tqdm(train_data, total=len(train_data), ncols=100, desc=desc)
        total_loss = None
        for batch in batches:
            part, share = shard_batch(batch, self.model)
            self.optimizer.zero_grad()
            loss_value = 0.0
            if share > 0:
                with torch.autocast(device_type=self.device.type, enabled=self.enable_amp):
                    losses = loss_func(part.to(self.device))
                loss = sum(losses) if isinstance(losses, tuple) else losses
                self._check_nan(loss)
                scaler.scale(loss * share).backward()
                loss_value = share * loss.item()
            else:
                scaler.scale(torch.zeros((), device=self.device))  # (a scaler that scaled nothing cannot step)
            stop, loss_value = reduce_gradients(params, [float(stop_requested()), loss_value])
            if stop:  # a Ctrl-C reached some rank: every rank stops at this same step
                raise KeyboardInterrupt
            if self.clip_grad_norm:
                clip_grad_norm_(params, **self.clip_grad_norm)
            scaler.step(self.optimizer)
            scaler.update()
            total_loss = loss_value if total_loss is None else total_loss + loss_value
        return total_loss

    @torch.no_grad()
    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if not self.distributed or not eval_data:
            return super().evaluate(eval_data, load_best_model=load_best_model, model_file=model_file,
                                    show_progress=show_progress)  # fmt: skip
        if load_best_model:
            file = model_file or self.saved_model_file
            checkpoint = on_rank0(lambda: torch.load(file, map_location="cpu", weights_only=True))
            self.model.load_state_dict(checkpoint["state_dict"])
            self.model.load_other_parameter(checkpoint.get("other_parameter"))
            self.logger.info(f"Loading model structure and parameters from {file}")
        self.model.eval()
        build_item_tables(self.model)
        if isinstance(eval_data, FullSortEvalDataLoader):
            eval_func = self._full_sort_batch_eval
            if self.item_tensor is None:
                self.item_tensor = eval_data._dataset.get_item_feature().to(self.device)
        else:
            eval_func = self._neg_sample_batch_eval
        if self.config["eval_type"] == EvaluatorType.RANKING:
            self.tot_item_num = eval_data._dataset.item_num
        start, end = shard_bounds(len(eval_data), world_size(), rank())
        batches = tqdm(eval_data, total=end, ncols=100, desc=set_color("Evaluate   ", "pink")) if show_progress \
            else eval_data
        for index, batched_data in enumerate(batches):
            if index >= end:
                break
            if index >= start:
                interaction, scores, positive_u, positive_i = eval_func(batched_data)
                self.eval_collector.eval_batch_collect(scores, interaction, positive_u, positive_i)
        self.eval_collector.model_collect(self.model)
        struct = merge_eval_structs(self.eval_collector.get_data_struct())
        result = self.evaluator.evaluate(struct)
        self.wandblogger.log_eval_metrics(result, head="eval")
        return result
