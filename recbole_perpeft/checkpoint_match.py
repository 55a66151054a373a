"""Whether a checkpoint belongs to this run's data and model shape, asked before it is loaded.

Every checkpoint we write records (``resume.ResumableTrainerMixin``):

* ``data_fingerprint``: the dataset's name, the user sample (``user_sample_ratio`` and the seed that drew
  it), the numbers of users and items and a hash of the remapped ids (each id's original token, in id
  order: the same files under the same sample give the same hash, another sample or dataset another);
* ``run_keys``: the values of the keys that fix the model's shape (``SHAPE_KEYS``).

``--resume`` compares both with the run's, ``global_checkpoint`` the fingerprint; a difference is refused
with one line naming both sides (without this, a checkpoint of another dataset of the same shapes is loaded
silently, and one of another sample ends in a state_dict size-mismatch traceback). A checkpoint written
before these records existed is not compared.
"""

from __future__ import annotations

import hashlib

# Keys that change which weights a model has, or their shapes, or what it learns (compared on --resume; not for
# global_checkpoint, whose stage-1 GlobalPEFT may be shared by grouped models of other keys: compare.py).
SHAPE_KEYS = ("n_groups", "grouping_method", "MAX_ITEM_LIST_LENGTH", "hidden_size", "inner_size", "n_layers",
              "n_heads", "backbone", "peft_type", "peft_config", "adapt_layers", "modalities", "foundation_model",
              "loss_type")  # fmt: skip


def data_fingerprint(dataset, config) -> dict:
    digest = hashlib.sha256()
    for field in (dataset.uid_field, dataset.iid_field):
        digest.update("\x1f".join(map(str, dataset.field2id_token[field])).encode("utf-8"))
        digest.update(b"\x1e")
    ratio = config["user_sample_ratio"] if "user_sample_ratio" in config else None
    return {
        "dataset": str(config["dataset"]),
        "user_sample_ratio": float(ratio) if ratio is not None else 1.0,
        "seed": int(config["seed"]),
        "users": int(dataset.user_num) - 1,  # (id 0 is RecBole's padding)
        "items": int(dataset.item_num) - 1,
        "ids": digest.hexdigest()[:16],
    }


def run_keys(config) -> dict:
    return {key: str(config[key]) for key in SHAPE_KEYS if key in config}


def describe(fingerprint: dict) -> str:
    sample = "" if fingerprint["user_sample_ratio"] == 1 else \
        f", user_sample_ratio {fingerprint['user_sample_ratio']:g} (seed {fingerprint['seed']})"  # fmt: skip
    return (f"{fingerprint['dataset']}{sample}: {fingerprint['users']} users, {fingerprint['items']} items, "
            f"ids {fingerprint['ids']}")  # fmt: skip


def check_checkpoint_matches(checkpoint: dict, path: str, what: str, fingerprint: dict | None, config,
                             keys=SHAPE_KEYS) -> None:  # fmt: skip
    """A ValueError naming ``what`` (``--resume``, ``global_checkpoint``), ``path`` and both sides, if
    ``checkpoint`` was written on other data (``fingerprint``: this run's) or with another value of one
    of ``keys``."""
    saved = checkpoint.get("data_fingerprint")
    other = saved is not None and fingerprint is not None and \
        (saved["ids"], saved["dataset"]) != (fingerprint["ids"], fingerprint["dataset"])  # fmt: skip
    if other:
        raise ValueError(
            f"{what}={path} was trained on {describe(saved)}; this run has {describe(fingerprint)}. "
            f"Give the dataset and user sample it was trained on (--dataset, --user_sample_ratio, --seed), "
            f"or start anew without {what}."
        )
    saved_keys, now = checkpoint.get("run_keys") or {}, run_keys(config)
    for key in keys:
        if key in saved_keys and key in now and saved_keys[key] != now[key]:
            raise ValueError(
                f"{what}={path} was trained with {key}={saved_keys[key]}; this run has {key}={now[key]}. "
                f"Pass --{key}={saved_keys[key]} to use it, or start anew without {what}."
            )
