"""Cache files that concurrent runs and crashes cannot corrupt: the one helper every cache writer uses.

Two runs on one ``cache_dir`` (two seeds in two shells, a comparison started twice) may need the same
cache entry at the same time. Every cache build goes::

    if not complete():                       # no lock: a finished entry is only read
        with build_lock(base, outputs):      # a second process waits here (and says so) ...
            if not complete():               # ... then finds the first one's result
                with atomic_output(path) as tmp:
                    write tmp                # renamed onto path when the block succeeds

- ``atomic_output`` writes under a name unique to the process (``<path>.<pid>-<random>.tmp``) and
  renames it into place (``os.replace``): a reader sees the old file or the whole new one, never half
  of one; a file is never rewritten in place, so a memory-mapped reader keeps its (old) inode even
  when a later build replaces the file. An entry of several files renames its marker file last.
- ``build_lock`` holds ``fcntl.flock`` on a hidden ``.<name>.lock`` beside the entry. The kernel drops
  it when its holder dies (killed, crashed), so a waiting process then takes over; a lock file's
  existence means nothing. Under the lock, temporary files a killed build left are removed. Where
  flock is unavailable (no ``fcntl``, a filesystem without locks) builds run unlocked: still atomic,
  only possibly done twice.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from logging import getLogger

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

__all__ = ["atomic_output", "build_lock", "lock_path", "temp_path", "write_json_atomic"]

_warned_unlocked = False


def temp_path(path: str) -> str:
    """A temporary name beside ``path``, unique to this process and call."""
    return f"{path}.{os.getpid()}-{secrets.token_hex(4)}.tmp"


def lock_path(path: str) -> str:
    """The lock file of the cache entry ``path`` (hidden, beside it)."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.lock")


@contextmanager
def atomic_output(path: str) -> Iterator[str]:
    """Yield a temporary path to write; on success it replaces ``path`` atomically, on an error it is
    removed and ``path`` stays as it was."""
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def write_json_atomic(path: str, payload) -> None:
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        json.dump(payload, f)


def _remove_stale_temps(outputs: Iterable[str]) -> None:
    """Temporary files of ``outputs``: under the entry's lock, only a dead build can have left them."""
    for output in outputs:
        for stale in glob.glob(glob.escape(output) + ".*.tmp"):
            try:
                os.remove(stale)
            except OSError:
                pass


@contextmanager
def build_lock(path: str, outputs: Iterable[str] = (), what: str | None = None) -> Iterator[bool]:
    """Hold the exclusive lock of the cache entry ``path`` (blocking; logs once if another process holds
    it: ``what`` names the entry). Yields whether the lock is held (False where flock is unavailable).
    Under the lock, leftover temporary files of ``outputs`` are removed first."""
    global _warned_unlocked
    logger = getLogger()
    fd = None
    if fcntl is not None:
        try:
            fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.info(f"Waiting for another process that is building {what or path} (same cache_dir) ...")
                fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException as err:
            if fd is not None:
                os.close(fd)
                fd = None
            if not isinstance(err, OSError):  # Ctrl-C while waiting
                raise
            # OSError: a read-only cache_dir, a filesystem without flock
            if not _warned_unlocked:
                _warned_unlocked = True
                logger.warning(
                    f"Cannot lock cache files in {os.path.dirname(path) or '.'} ({err}): runs sharing this "
                    "cache_dir may build the same cache twice (each write is still atomic)."
                )
    try:
        if fd is not None:
            _remove_stale_temps(outputs)
        yield fd is not None
    finally:
        if fd is not None:
            os.close(fd)  # releases the flock
