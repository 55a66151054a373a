"""Checks a run makes before it trains, on what the Config alone cannot tell: that its output folders and
result file can be written (else the failure comes after training, in torch.save or in the result JSON,
and the result is lost), and that ``MAX_ITEM_LIST_LENGTH`` fits the data (sequences of 100000 positions
on a 94-user dataset take tens of GB before anything says why). Each ends in one ValueError naming the
key, the value and what to do."""

from __future__ import annotations

import os
import tempfile
from logging import getLogger

import numpy as np
import psutil
from recbole.utils import ModelType

BYTES_PER_POSITION = 8  # RecBole's list fields (item ids, timestamps, ...) are int64 / float64
MEMORY_SHARE = 0.5  # refuse sequences that would take more than this share of the free memory


def check_writable_outputs(config, result_file: str | None, saved: bool) -> None:
    folders = [("checkpoint_dir", config["checkpoint_dir"])] if saved else []
    if config["cache_dir"]:
        folders.append(("cache_dir", config["cache_dir"]))
    for key, folder in folders:
        writable_folder(folder, f"{key} {folder}", f"--{key}=<a folder you can write to>")
    if result_file:
        if os.path.isdir(result_file):
            raise ValueError(f"--result_file={result_file} is a folder: give a file path, e.g. "
                             f"--result_file={os.path.join(result_file, 'result.json')}.")  # fmt: skip
        folder = os.path.dirname(os.path.abspath(result_file))
        writable_folder(folder, f"--result_file={result_file}: its folder", "--result_file=<a path you can write to>")


def writable_folder(folder: str, what: str, fix: str) -> None:
    """Create ``folder`` if needed and write (then remove) a file in it, or a ValueError: ``what`` is not
    writable (the OS's reason); ``fix``."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{what} is not a writable folder (a file of that name is there): give {fix}.")
    try:
        os.makedirs(folder, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".write-test-")
        os.close(handle)
        os.remove(probe)
    except OSError as err:
        raise ValueError(f"{what} is not a writable folder ({err.strerror or err}): give {fix}.") from None


def longest_history(dataset) -> int:
    """The most interactions any user of ``dataset`` has (0 for no interaction)."""
    users = dataset.inter_feat[dataset.uid_field]
    users = users.numpy() if hasattr(users, "numpy") else np.asarray(users)
    return int(np.bincount(users).max()) if len(users) else 0


def check_sequence_length(config, dataset, available: int | None = None) -> None:
    """``MAX_ITEM_LIST_LENGTH`` against the data: above the longest history (every position past it is
    padding), refused if RecBole's training sequences (one row per interaction, one int64 per position
    and list field) would take more than half the free memory (``available`` bytes, default: the
    machine's), else one warning where the user set it."""
    if config["MODEL_TYPE"] != ModelType.SEQUENTIAL:
        return
    length, longest = int(config["MAX_ITEM_LIST_LENGTH"]), longest_history(dataset)
    if length < longest:
        return
    fields = max(1, len(dataset.inter_feat.columns) - 1)  # every field but the user id becomes a list field
    need = len(dataset.inter_feat) * length * fields * BYTES_PER_POSITION
    available = psutil.virtual_memory().available if available is None else available
    bound = f"the longest history in {config['dataset']} is {longest} interactions (at most {longest - 1} items " \
            "before a target)"  # fmt: skip
    if need > MEMORY_SHARE * available:
        raise ValueError(
            f"MAX_ITEM_LIST_LENGTH={length} would need about {need / 2**30:.1f} GiB for the training sequences "
            f"({len(dataset.inter_feat)} interactions x {length} positions x {fields} fields), with "
            f"{available / 2**30:.1f} GiB free; {bound}: set --MAX_ITEM_LIST_LENGTH={max(1, longest - 1)} or lower."
        )
    if "MAX_ITEM_LIST_LENGTH" in config.external_config_dict:
        getLogger().warning(f"MAX_ITEM_LIST_LENGTH={length}: {bound}, the positions beyond are only padding.")
