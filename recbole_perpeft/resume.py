"""Resume that reproduces: a run killed at any point and resumed with ``--resume`` ends with the same
``best_valid_result`` and ``test_result`` as the uninterrupted run (bit for bit on CPU).

RecBole's checkpoint holds the weights, the optimizer and the epoch; resuming from it replays the
seeded random streams from their start, so the resumed epochs see other batches and negatives. Every
checkpoint we write (the best-validation one, and ``<best>-last.pth`` rewritten at the start of every
epoch and at the end of training, so a kill loses at most one epoch) also holds:

* the random states (python, numpy's global one, torch's CPU and CUDA ones),
* the training loader's state (its torch generator; our loaders add their negative sampler's numpy
  generator and the group batch sampler's epoch counter, see ``loader_state``),
* the best-so-far record (``best_valid_result``), the early-stopping counter, whether training
  stopped early, and the seconds of every epoch so far (the resumed result JSON stays complete).

Everything is a tensor or a plain Python value: the files load with ``torch.load(weights_only=True)``.

In a run of several processes (recbole_perpeft/distributed.py) rank 0 writes the checkpoints, with every
rank's random states (``rank_rng_states``: their dropout differs), and reads them for every rank: only its
machine needs the files. The loader state is the global batch stream's, the same on every rank, so a
checkpoint resumes on any number of processes (bit for bit on the same number).
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import shutil
import zipfile
from time import time

try:
    import resource
except ImportError:  # (Windows)
    resource = None

import numpy as np
import torch

from recbole_perpeft.checkpoint_match import (
    check_checkpoint_matches,
    data_fingerprint,
    run_keys,
)
from recbole_perpeft.distributed import DistributedTrainerMixin, gather_objects, on_rank0, rank, world_size
from recbole_perpeft.quiet import silence_known_warnings

LAST_SUFFIX = "-last"


class TrainingInterrupted(Exception):
    """Ctrl-C during training; ``checkpoint`` is the file to resume from (None: nothing saved yet)."""

    def __init__(self, checkpoint: str | None):
        self.checkpoint = checkpoint
        super().__init__(checkpoint)


def last_checkpoint_path(best_file: str) -> str:
    stem, ext = os.path.splitext(best_file)
    return f"{stem}{LAST_SUFFIX}{ext}"


def best_checkpoint_path(path: str) -> str:
    """The best-validation checkpoint of ``path`` (itself, or the file a ``-last`` file belongs to)."""
    stem, ext = os.path.splitext(path)
    return stem.removesuffix(LAST_SUFFIX) + ext if stem.endswith(LAST_SUFFIX) else path


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """``torch.load(weights_only=True)``, with one clear line for a file that is not a whole checkpoint.
    In several processes a collective call: rank 0 reads, every rank gets it (tensors on the CPU)."""
    return on_rank0(_read_checkpoint, path, "cpu" if world_size() > 1 else map_location)


def _read_checkpoint(path: str, map_location) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint {path} does not exist.")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        reason = str(err).splitlines()[0][:200]
        raise ValueError(
            f"Checkpoint {path} cannot be read ({type(err).__name__}: {reason}): it is truncated, corrupt or not "
            "a recbole_perpeft checkpoint. Resume from another one (the run's -last.pth or best .pth), or start anew."
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"Checkpoint {path} is not a training checkpoint (no state_dict): give a .pth a run wrote.")
    return checkpoint


def check_checkpoints_fit(config, dataset, resume: str | None) -> dict:
    """Refuse, before anything trains, a ``--resume`` or ``global_checkpoint`` written on other data or
    with another model shape (checkpoint_match.py); returns this run's data fingerprint."""
    fingerprint = data_fingerprint(dataset, config)
    if resume:
        source = resume_source(resume)
        check_checkpoint_matches(load_checkpoint(source), resume, "--resume", fingerprint, config)
    global_checkpoint = config["global_checkpoint"] if "global_checkpoint" in config else None
    if global_checkpoint and not resume:
        check_checkpoint_matches(load_checkpoint(global_checkpoint), global_checkpoint, "global_checkpoint",
                                 fingerprint, config, keys=())  # fmt: skip
    return fingerprint


class DiskFull(OSError):
    """A checkpoint could not be written for want of space; its message says which file and what to do."""

    def __str__(self) -> str:
        return self.strerror


def _is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    # torch's zip writer reports a short write as "unexpected pos" / "failed writing file" (no errno).
    text = str(err)
    return isinstance(err, RuntimeError) and any(s in text for s in ("unexpected pos", "failed writing", "No space"))


def _why_full(err: BaseException) -> str:
    """"no space left on device", or the file size limit where one is set (it fails the write the same way)."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0] if resource is not None else None
    if getattr(err, "errno", None) == errno.EFBIG or limit not in (None, getattr(resource, "RLIM_INFINITY", None)):
        return f"no space left on device, or the file size limit reached (ulimit -f: {limit} bytes)"
    return "no space left on device"


def resume_source(path: str) -> str:
    """The file to resume from: the later of the best checkpoint and its ``-last`` companion (rank 0's
    files, in several processes)."""
    return on_rank0(_latest_file, path)


def _latest_file(path: str) -> str:
    best = best_checkpoint_path(path)
    last = last_checkpoint_path(best)
    if not os.path.isfile(last):
        return path
    if not os.path.isfile(best):
        return last
    # -last is rewritten at the start of every epoch and at the end; the best file only on improvement.
    return last if _read_checkpoint(last, "cpu")["epoch"] >= _read_checkpoint(best, "cpu")["epoch"] else best


# --- random states -------------------------------------------------------------------------------------


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def loader_state(loader) -> dict:
    """A training loader's random state: its own ``state_dict()`` if it has one, else its generator
    (RecBole's loaders: their samplers draw from numpy's global state, saved by :func:`rng_state`)."""
    if hasattr(loader, "state_dict"):
        return loader.state_dict()
    return {"generator": loader.generator.get_state()}


def set_loader_state(loader, state: dict) -> None:
    if hasattr(loader, "load_state_dict"):
        loader.load_state_dict(state)
    else:
        loader.generator.set_state(state["generator"])


def _plain_config(config) -> dict:
    """The resolved config as plain values (quick_start.json_safe's conversion; not imported: an import circle)."""
    import json

    plain = json.dumps(config.final_config_dict, default=lambda v: v.item() if hasattr(v, "item") else str(v))
    return json.loads(plain)


# --- the trainer side ------------------------------------------------------------------------------------


class ResumableTrainerMixin(DistributedTrainerMixin):
    """Mixed into a RecBole trainer (before :class:`~recbole_perpeft.compat.SafeCheckpointMixin`):
    checkpoints that hold the whole training state, a ``-last`` checkpoint every epoch, a resume that
    restores all of it, and Ctrl-C turned into :class:`TrainingInterrupted` naming the file to resume.
    Every trainer of ours has it, so it brings the multi-process training along (distributed.py)."""

    def __init__(self, config, model):
        self.epoch_seconds: list[float] = []
        self.stopped_early = False
        self._train_data = None
        self._pending_loader_state = None
        self._latest_valid = None
        self._saving = False
        self._last_epoch = -1
        self._rank_rng_states = None
        self.data_fingerprint = None  # this run's data (checkpoint_match.py), recorded in every checkpoint
        silence_known_warnings()  # (RecBole's training loop warns: quiet.py), also where quick_start is not used
        super().__init__(config, model)

    @property
    def last_model_file(self) -> str:
        return last_checkpoint_path(self.saved_model_file)

    def _checkpoint_state(self, epoch: int) -> dict:
        state = super()._checkpoint_state(epoch)
        best_result = self.best_valid_result
        if self._latest_valid is not None and self._latest_valid[0] == self.best_valid_score:
            best_result = self._latest_valid[1]  # RecBole saves before it records the new best result
        state.update(
            best_valid_result=None if best_result is None else {k: float(v) for k, v in best_result.items()},
            stopped_early=bool(self.stopped_early),
            epoch_seconds=list(self.epoch_seconds),
            rng_state=rng_state(),
            run_keys=run_keys(self.config),
        )
        if self.data_fingerprint is not None:
            state["data_fingerprint"] = self.data_fingerprint
        if self._rank_rng_states is not None:
            state["rank_rng_states"] = self._rank_rng_states
        if self._train_data is not None:
            state["loader_state"] = loader_state(self._train_data)
        # The whole resolved config, so that recbole_perpeft.load(checkpoint) needs nothing re-supplied.
        state["run_config"] = _plain_config(self.config)
        return state

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        if world_size() > 1:  # a collective call: every rank saves (rank 0 writes)
            self._rank_rng_states = gather_objects(rng_state())
        try:
            super()._save_checkpoint(epoch, verbose=verbose, **kwargs)
        except (OSError, RuntimeError) as err:
            if not _is_disk_full(err):
                raise
            target = kwargs.get("saved_model_file", self.saved_model_file)
            folder = os.path.dirname(os.path.abspath(target))
            free = shutil.disk_usage(folder).free / 2**20
            # (the partial file was written aside and is removed: compat.SafeCheckpointMixin, atomic_output)
            raise DiskFull(errno.ENOSPC, f"{_why_full(err)}: saving checkpoint {target} failed ({free:.0f} "
                           "MiB free there; nothing half-written is left): free space or use --checkpoint_dir=<a "
                           "folder on another disk>, then resume from the last checkpoint.") from None

    def _save_last(self, epoch: int) -> None:
        self._save_checkpoint(epoch, verbose=False, saved_model_file=self.last_model_file)

    def _valid_epoch(self, valid_data, show_progress=False):
        self._latest_valid = super()._valid_epoch(valid_data, show_progress=show_progress)
        return self._latest_valid

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        if self._saving and epoch_idx > self.start_epoch:
            # The previous epoch and its validation are done: what a resume needs to go on from here.
            self._save_last(epoch_idx - 1)
        start = time()
        loss = super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)
        self.epoch_seconds.append(time() - start)
        self._last_epoch = epoch_idx
        return loss

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        self._train_data, self._saving = train_data, saved
        if self.data_fingerprint is None and hasattr(train_data, "_dataset"):
            self.data_fingerprint = data_fingerprint(train_data._dataset, self.config)
        if self._pending_loader_state is not None:
            set_loader_state(train_data, self._pending_loader_state)
            self._pending_loader_state = None
        if self.stopped_early or self.start_epoch >= self.epochs:
            # Nothing left to train. (RecBole's fit would write the current weights over the best checkpoint.)
            self.logger.info(f"Training had already ended at epoch {self.start_epoch - 1}; nothing to resume.")
            return self.best_valid_score, self.best_valid_result
        try:
            result = super().fit(train_data, valid_data, verbose=verbose, saved=saved,
                                 show_progress=show_progress, callback_fn=callback_fn)  # fmt: skip
        except KeyboardInterrupt:
            candidates = [self.last_model_file, self.saved_model_file] if saved else []
            raise TrainingInterrupted(next((f for f in candidates if os.path.isfile(f)), None)) from None
        self.stopped_early = self._last_epoch < self.epochs - 1
        if saved:
            self._save_last(self._last_epoch)
        return result

    def resume_checkpoint(self, resume_file):
        resume_file = str(resume_file)
        source = resume_source(resume_file)
        # On the CPU, not self.device: the random and loader states must be CPU tensors (set_rng_state,
        # Generator.set_state, .numpy()); load_state_dict moves weights and optimizer state to the parameters.
        checkpoint = load_checkpoint(source, map_location="cpu")
        self.saved_model_file = best_checkpoint_path(resume_file)
        if checkpoint["config"]["model"].lower() != self.config["model"].lower():
            raise ValueError(
                f"--resume={resume_file} is a {checkpoint['config']['model']} checkpoint, not {self.config['model']}."
            )
        self.start_epoch = checkpoint["epoch"] + 1
        self.cur_step = checkpoint["cur_step"]
        self.best_valid_score = checkpoint["best_valid_score"]
        try:
            self.model.load_state_dict(checkpoint["state_dict"])
        except RuntimeError as err:
            first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
            raise ValueError(f"--resume={resume_file}: its weights do not fit this model ({first[:200]}): it was "
                             "trained with other settings or data; resume with those, or start anew.") from None
        self.model.load_other_parameter(checkpoint.get("other_parameter"))
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if "rng_state" not in checkpoint:
            self.logger.warning(
                f"{source} holds no random state (written by an older version): training resumes from epoch "
                f"{self.start_epoch}, but will not reproduce the uninterrupted run."
            )
        else:
            self.best_valid_result = checkpoint["best_valid_result"]
            self.stopped_early = checkpoint["stopped_early"]
            self.epoch_seconds = list(checkpoint["epoch_seconds"])
            set_rng_state(checkpoint["rng_state"])
            self._set_rank_rng_state(checkpoint.get("rank_rng_states"))
            self._pending_loader_state = checkpoint.get("loader_state")
        self.logger.info(f"Checkpoint {source} loaded. Resume training from epoch {self.start_epoch}.")

    def _set_rank_rng_state(self, saved: list | None) -> None:
        """This rank's torch generators (dropout) from a checkpoint of as many processes; with another
        number, rank 0 continues rank 0's and the others are seeded anew (python's and numpy's generators
        are rank 0's everywhere: distributed.sync_host_rng)."""
        if world_size() == 1 or rank() == 0:
            return
        if saved is not None and len(saved) == world_size():
            state = saved[rank()]
            torch.set_rng_state(state["torch"])
            if "cuda" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda"])
            return
        torch.manual_seed(int(self.config["seed"]) + 1000 * self.start_epoch + rank())
        self.logger.info(f"Checkpoint written by {len(saved) if saved else 1} process(es): rank {rank()}'s dropout "
                         "draws start anew (results match the uninterrupted run only in distribution).")
