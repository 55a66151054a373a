"""RecBole 1.2.1 on today's stack: every fix in one place.

Pins (declared in setup.cfg, checked here so a wrong environment fails with a clear message):

* ``numpy<2``: ``Config.compatibility_settings`` aliases ``np.float_``, ``np.int_`` ... that numpy 2
  removed, so constructing any RecBole ``Config`` raises ``AttributeError``.
* ``pandas<3``: RecBole fills missing atomic-file values with ``df[field].fillna(..., inplace=True)``;
  under pandas 3 copy-on-write that is a silent no-op and NaN reaches the token remapping.

Patches (no pin can fix them):

* torch >= 2.6 loads checkpoints with ``weights_only=True``. RecBole pickles its whole ``Config``
  object with pickle protocol 4 into every checkpoint, so its own ``resume_checkpoint`` and
  ``evaluate(load_best_model=True)`` refuse the files it wrote. :class:`SafeCheckpointMixin` writes
  checkpoints that hold only tensors and plain Python values, so RecBole's unchanged loading code
  reads them with ``weights_only=True`` and no file we did not write is ever unpickled.
* ``recbole.quick_start`` imports ``ray.tune``, and the ray that RecBole 1.2.1 admits needs
  ``pkg_resources`` (gone from recent setuptools). We never import ``recbole.quick_start``; our
  :mod:`recbole_perpeft.quick_start` uses the lower-level API instead.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from recbole_perpeft.data.cache_files import atomic_output

NUMPY_MAX_MAJOR = 1
PANDAS_MAX_MAJOR = 2


def check_environment() -> None:
    """Fail early, naming the package and the fix, when a pin is not honoured."""
    problems = []
    if int(np.__version__.split(".")[0]) > NUMPY_MAX_MAJOR:
        problems.append(f"numpy {np.__version__} (RecBole 1.2.1 needs numpy<2)")
    if int(pd.__version__.split(".")[0]) > PANDAS_MAX_MAJOR:
        problems.append(f"pandas {pd.__version__} (RecBole 1.2.1 needs pandas<3)")
    if problems:
        raise ImportError(
            "recbole_perpeft: incompatible packages installed: "
            + "; ".join(problems)
            + ". Reinstall with `pip install -e .` from the project root, which pins them."
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
        if not self.config["single_spec"] and self.config["local_rank"] != 0:
            return
        saved_model_file = kwargs.pop("saved_model_file", self.saved_model_file)
        # Written aside and renamed: a run killed while saving leaves the previous file whole.
        with atomic_output(saved_model_file) as tmp:
            torch.save(self._checkpoint_state(epoch), tmp)  # default protocol: the weights-only unpickler reads it
        if verbose:
            self.logger.info(f"Saving current: {saved_model_file}")


def with_safe_checkpoints(trainer_class: type) -> type:
    """Return ``trainer_class`` with :class:`SafeCheckpointMixin` in front (idempotent)."""
    if issubclass(trainer_class, SafeCheckpointMixin):
        return trainer_class
    return type(trainer_class.__name__, (SafeCheckpointMixin, trainer_class), {})
