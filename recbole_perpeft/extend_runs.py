"""``--extend`` (the comparison and ``recbole-perpeft reproduce``): a finished run whose settings differ
from the ones asked now only in a longer schedule is continued by ``--resume`` from its end-of-training ``-last``
checkpoint, not reused as it is nor trained again from scratch.

That is the longer run itself: a resumed run reproduces the uninterrupted one (recbole_perpeft/resume.py), and
raising the epochs changes nothing before the old last epoch (no learning-rate schedule reads them; a run that
stopped early stops at once when continued, as it would have from scratch). The schedule is ``epochs`` for a
single-stage model and ``stage2_epochs`` for a two-stage one, whose stage 1 (``stage1_epochs``) must be the same.

The old run stays as it was: its checkpoints are copied under a new name first (``<stem>-<key><n>.pth`` and its
``-last`` and ``-groups`` companions) and its result JSON is kept as ``<label>-seed<s>.<key><old>.json``; the
longer run's JSON replaces it only when it is complete (an interrupted extension continues from the copies when
the command is run again).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from recbole_perpeft.resume import last_checkpoint_path, resume_source

SCHEDULE_KEYS = ("epochs", "stage1_epochs", "stage2_epochs")


def schedule_key(grouped: bool) -> str:
    return "stage2_epochs" if grouped else "epochs"


def extension(result: dict, changed: dict, grouped: bool) -> tuple[int, int] | str | None:
    """(old, new) length of ``result``'s schedule when the run can be continued to the settings asked now;
    a reason (str) when only its schedule differs but it cannot be; None when it is not a schedule change.
    ``changed``: {key: (the run's value, the value asked)} of the keys that differ (compare.changed_values)."""
    key = schedule_key(grouped)
    ignored = {"epochs"} if grouped else {"stage1_epochs", "stage2_epochs"}  # keys the model does not read
    if key not in changed or any(k not in ignored and k != key for k in changed):
        return None
    old, new = changed[key]
    try:
        old, new = int(old), int(new)
    except (TypeError, ValueError):
        return None
    if new < old:
        return f"it trained {key}={old}, more than the {new} asked: delete it to train it anew"
    if grouped and result.get("weight_decay_tuning"):
        return ("its stage 2 chose a weight decay from weight_decay_grid by validation, which a longer stage 2 "
                "could choose otherwise: delete it to train it anew")  # fmt: skip
    checkpoint = result.get("checkpoint")
    if not checkpoint:
        return "its result names no checkpoint: delete it to train it anew"
    needed = [last_checkpoint_path(str(checkpoint)), *([groups_file(str(checkpoint))] if grouped else [])]
    missing = [f for f in needed if not os.path.isfile(f)]
    if missing and not os.path.isfile(extended_checkpoint(str(checkpoint), key, new)):
        return f"{', '.join(missing)} is gone: delete the run's result to train it anew"
    return old, new


def groups_file(checkpoint: str) -> str:
    from recbole_perpeft.two_stage import groups_file as of_stage2

    return of_stage2(checkpoint)


def extended_checkpoint(checkpoint: str, key: str, new: int) -> str:
    stem, ext = os.path.splitext(checkpoint)
    return f"{stem}-{key}{new}{ext}"


def kept_result_file(path: Path, key: str, old: int) -> Path:
    return path.with_name(f"{path.stem}.{key}{old}{path.suffix}")


def copy_checkpoints(checkpoint: str, key: str, new: int, grouped: bool) -> str:
    """The file to resume the longer run from: the old run's checkpoints copied under the new name (those of an
    interrupted extension, where they exist, are continued instead)."""
    target = extended_checkpoint(checkpoint, key, new)
    if not os.path.isfile(target) and not os.path.isfile(last_checkpoint_path(target)):
        pairs = [(checkpoint, target), (last_checkpoint_path(checkpoint), last_checkpoint_path(target))]
        if grouped:
            pairs.append((groups_file(checkpoint), groups_file(target)))
        for source, copy in pairs:
            if os.path.isfile(source):
                shutil.copyfile(source, copy + ".part")
                os.replace(copy + ".part", copy)
    return resume_source(target)


def extend_run(run, result: dict, path: Path, lengths: tuple[int, int], grouped: bool, run_args: dict) -> dict:
    """Continue the finished run at ``path`` (``result``) to the new length by ``run(**run_args, resume=...)``
    (quick_start.run); keep the old JSON beside it; return the longer run's result."""
    from recbole_perpeft.data.cache_files import atomic_output

    key, (old, new) = schedule_key(grouped), lengths
    resume = copy_checkpoints(str(result["checkpoint"]), key, new, grouped)
    partial = path.with_name(f"{path.stem}.extending{path.suffix}")
    longer = run(**run_args, result_file=str(partial), resume=resume)
    if not partial.is_file():  # (a run in several processes writes it on rank 0's machine only)
        from recbole_perpeft.quick_start import write_json

        write_json(str(partial), longer)
    kept = kept_result_file(path, key, old)
    with atomic_output(str(kept)) as tmp:
        shutil.copyfile(path, tmp)
    os.replace(partial, path)  # the old JSON is kept first: a kill in between loses nothing
    print(f"[extend] {path}: {key} {old} -> {new}; the {key}={old} result is kept as {kept}", flush=True)
    return longer
