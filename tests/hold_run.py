"""The entry point of ``run_recbole_perpeft.py`` for the kill-and-resume tests, with a pause at the interrupt point.

A tiny run's epochs take about 0.1 s, so a test's watcher that sends its signal once a ``-last`` checkpoint
appears could lose the race on a loaded machine: the remaining epochs ended before the signal arrived (seen
once in CI-like conditions, beside two training jobs). Here the run, right after writing a ``-last``
checkpoint whose file name matches ``HOLD_PATTERN`` for an epoch >= ``HOLD_AFTER_EPOCH``, sleeps (10 minutes
at most) at the start of the next epoch, so the signal lands there however slow the watcher is. Started by
:func:`tests.tiny.start` with ``hold=(pattern, epoch)``. The hold is set up on import, not under ``__main__``:
the ranks of a run in several processes (spawned) import this file again as ``__mp_main__``, and every rank
then pauses at the same point (each calls ``_save_last``, a collective)."""

from __future__ import annotations

import fnmatch
import os
import time
from pathlib import Path

from recbole_perpeft.cli import main  # all that run_recbole_perpeft.py runs
from recbole_perpeft.resume import ResumableTrainerMixin

HOLD_SECONDS = 600


def hold_after_save(pattern: str, after_epoch: int) -> None:
    save_last = ResumableTrainerMixin._save_last

    def _save_last(self, epoch: int) -> None:
        save_last(self, epoch)
        if epoch >= after_epoch and fnmatch.fnmatch(Path(self.last_model_file).name, pattern):
            time.sleep(HOLD_SECONDS)  # the test's SIGINT (KeyboardInterrupt here) or SIGKILL lands in this sleep

    ResumableTrainerMixin._save_last = _save_last


hold_after_save(os.environ["HOLD_PATTERN"], int(os.environ["HOLD_AFTER_EPOCH"]))

if __name__ == "__main__":
    main()
