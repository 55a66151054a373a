"""RecBole 1.2.1 on today's stack: every fix in one place.

Versions (declared in setup.cfg; docs/install.md says how the install gets them):

* numpy 1.24 to 2.x. ``Config.compatibility_settings`` aliases ``np.float_``, ``np.int_`` ...; numpy 2
  removed three of them (:data:`NUMPY2_ALIASES`), so constructing any RecBole ``Config`` raised
  ``AttributeError``. :func:`check_environment` (run before every ``Config``) restores those three as the
  names of the types they always meant, which is all RecBole needs: the quick start gives the same metrics,
  to the last digit, under numpy 1.26 and 2.x. No ``numpy<2`` pin, so a user's numpy 2 is never downgraded.
* ``pandas<3``, refused with one line (:func:`check_environment`) where pandas 3 is present anyway:
  RecBole fills missing atomic-file values with ``df[field].fillna(..., inplace=True)``, a silent no-op
  under pandas 3's copy-on-write (NaN reaches the token remapping), and its ``_remap`` then fails
  ("Length of values does not match length of index"). Supporting pandas 3 would mean re-implementing
  RecBole's loading; pandas 2 is what RecBole 1.2.1 was written for.
* ray: RecBole's metadata requires ``ray<=2.6.3`` (no wheel for Python 3.12+) for ``recbole.quick_start``'s
  ``ray.tune`` import. We never import ``recbole.quick_start`` (our :mod:`recbole_perpeft.quick_start` uses
  the lower-level API), so the install drops ray (pyproject.toml's ``[tool.uv]`` override).

Patches (no pin can fix them):

* torch >= 2.6 loads checkpoints with ``weights_only=True``. RecBole pickles its whole ``Config``
  object with pickle protocol 4 into every checkpoint, so its own ``resume_checkpoint`` and
  ``evaluate(load_best_model=True)`` refuse the files it wrote. :class:`SafeCheckpointMixin` writes
  checkpoints that hold only tensors and plain Python values, so RecBole's unchanged loading code
  reads them with ``weights_only=True`` and no file we did not write is ever unpickled.

RecBole 1.2.1's multi-process training (what :mod:`recbole_perpeft.distributed` replaces it with):

* ``Config._init_device`` always asks for NCCL and a CUDA device: :func:`init_distributed_device`
  uses gloo on a CPU, and refuses too few GPUs with a message instead of an ``assert``.
* ``AbstractTrainer.__init__`` wraps the model in ``DistributedDataParallel(device_ids=[local_rank])``
  (CUDA only), and ``_train_epoch`` adds ``sum(p) * 0`` over every parameter each step so that
  every one gets a gradient: with a frozen foundation model inside, a pass over all of it.
  :class:`AbstractTrainerWithoutDDP` keeps the model unwrapped; our trainer reduces the gradients
  of the trainable parameters itself.
* ``Trainer._map_reduce`` weights each rank's (already rounded) metrics by ``len(batched_data)``,
  which is 4 for every batch (a tuple), and the evaluation loaders' ``DistributedSampler`` pads
  the users to a multiple of the world size by repeating some: both make the result differ from
  one process. :func:`merge_eval_structs` gathers the ranks' per-user rows and evaluates once.
* ``Trainer._save_checkpoint`` lets every process with ``local_rank`` 0 write, i.e. one per machine:
  :class:`SafeCheckpointMixin` writes on global rank 0 only.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from recbole.trainer import AbstractTrainer

from recbole_perpeft.data.cache_files import atomic_output

PANDAS_MAX_MAJOR = 2
# What numpy 2 removed that RecBole's Config.compatibility_settings reads (its other aliases still exist).
NUMPY2_ALIASES = {"float_": "float64", "complex_": "complex128", "unicode_": "str_"}


def restore_numpy_aliases() -> None:
    """numpy 2's removed names, pointing at what numpy 1 defined them as (a no-op on numpy 1)."""
    for old, new in NUMPY2_ALIASES.items():
        if not hasattr(np, old):
            setattr(np, old, getattr(np, new))


def pandas_fix_command() -> str:
    """The command that installs a pandas RecBole 1.2.1 runs under into this interpreter's environment:
    with its pip where it has one, with uv's pip interface otherwise (uv-made venvs have no pip)."""
    if importlib.util.find_spec("pip") is not None:
        return f'{sys.executable} -m pip install "pandas>=2,<3"'
    return f'uv pip install --python {sys.executable} "pandas>=2,<3"'


def check_environment() -> None:
    """Before any RecBole ``Config``: restore numpy 2's removed aliases; refuse pandas 3 in one line."""
    restore_numpy_aliases()
    if int(pd.__version__.split(".")[0]) > PANDAS_MAX_MAJOR:
        raise ImportError(
            f"recbole_perpeft: pandas {pd.__version__} is installed, but RecBole 1.2.1 needs pandas<3 (under pandas "
            "3 its fillna(inplace=True) fills nothing and its _remap fails with 'Length of values does not match "
            f"length of index'). Fix: {pandas_fix_command()}"
        )


def _plain(value):
    """A value torch's weights-only unpickler accepts (numpy scalars become Python numbers)."""
    if isinstance(value, np.generic):
        return value.item()
    return value


class SafeCheckpointMixin:
    """Mixed into a RecBole trainer: checkpoints loadable with ``torch.load(weights_only=True)``."""

    def _checkpoint_state(self, epoch: int) -> dict:
        return {
            # RecBole only reads config["model"] back; keep the identifying keys as plain strings.
            "config": {key: str(self.config[key]) for key in ("model", "dataset", "seed")},
            "epoch": int(epoch),
            "cur_step": int(self.cur_step),
            "best_valid_score": _plain(self.best_valid_score),
            "state_dict": self.model.state_dict(),
            "other_parameter": self.model.other_parameter(),
            "optimizer": self.optimizer.state_dict(),
        }

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        if not self.config["single_spec"] and dist.get_rank() != 0:  # one writer per run, not per machine
            return
        saved_model_file = kwargs.pop("saved_model_file", self.saved_model_file)
        # Written aside and renamed: a run killed while saving leaves the previous file whole.
        with atomic_output(saved_model_file) as tmp:
            torch.save(self._checkpoint_state(epoch), tmp)  # default protocol: the weights-only unpickler reads it
        if verbose:
            self.logger.info(f"Saving current: {saved_model_file}")


def with_safe_checkpoints(trainer_class: type) -> type:
    """Return ``trainer_class`` with :class:`SafeCheckpointMixin` in front (idempotent), and without
    RecBole's DDP wrapper (:class:`AbstractTrainerWithoutDDP`; ``ResumableTrainerMixin``, which every
    trainer of ours has, brings the multi-process training that replaces it)."""
    if issubclass(trainer_class, SafeCheckpointMixin):
        return trainer_class
    return type(trainer_class.__name__, (SafeCheckpointMixin, trainer_class, AbstractTrainerWithoutDDP), {})


# --- multi-process training ------------------------------------------------------------------------------


class AbstractTrainerWithoutDDP(AbstractTrainer):
    """Listed after RecBole's trainer among a trainer's bases, this comes right after ``Trainer`` in the
    MRO, so ``Trainer.__init__``'s ``super().__init__`` lands here instead of in ``AbstractTrainer``'s,
    which would wrap the model in ``DistributedDataParallel(device_ids=[local_rank])``: CUDA only, and
    built on a synchronising loss over every parameter. Gradients are reduced by
    :class:`~recbole_perpeft.distributed.DistributedTrainerMixin` instead."""

    def __init__(self, config, model):
        self.config = config
        self.model = model


def init_distributed_device(cfg: dict) -> None:
    """RecBole's ``Config._init_device`` for one process of a distributed run (``local_rank`` set):
    NCCL on CUDA device ``local_rank`` where ``gpu_id`` names GPUs and CUDA is there, gloo on the CPU
    otherwise. Joins the process group (``rank = local_rank + offset``) once per process."""
    gpu_id = cfg["gpu_id"]
    gpu_id = ",".join(map(str, gpu_id)) if isinstance(gpu_id, (tuple, list)) else str(gpu_id)
    cfg["gpu_id"] = gpu_id
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu_id
    local_rank, nproc = int(cfg["local_rank"]), int(cfg["nproc"] or 1)
    if cfg.get("use_gpu", True) and gpu_id.strip() and torch.cuda.is_available():
        gpus = [g for g in gpu_id.split(",") if g.strip()]
        if len(gpus) < nproc:
            raise ValueError(f"nproc={nproc} processes on GPUs need as many GPUs in gpu_id, got gpu_id='{gpu_id}': "
                             f"pass e.g. --gpu_id={','.join(map(str, range(nproc)))} (or --use_gpu=False for the CPU).")
        backend, device = "nccl", torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        backend, device = "gloo", torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method=f"tcp://{cfg['ip']}:{cfg['port']}",
                                rank=local_rank + int(cfg["offset"] or 0), world_size=int(cfg["world_size"]))
    cfg.update(device=device, single_spec=False)
    if local_rank != 0:  # as RecBole: one process per machine logs
        cfg.update(state="error", show_progress=False, verbose=False)


ROW_KEYS = ("rec.topk", "rec.meanrank", "rec.score", "rec.items", "data.label")  # the Collector's per-batch keys


def merge_eval_structs(struct):
    """Every rank's evaluation rows (``ROW_KEYS`` of RecBole's DataStruct), concatenated in rank order,
    put into ``struct`` (a collective call). With contiguous shares of the evaluation batches this is the
    single process's struct, so the evaluator computes the single process's metrics."""
    mine = {key: struct[key].cpu() for key in ROW_KEYS if key in struct}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    for key in ROW_KEYS:
        parts = [rows[key] for rows in every if key in rows]
        if parts:
            struct.set(key, torch.cat(parts))
    return struct
