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
- ``build_lock`` holds ``fcntl.flock`` on a hidden ``.<name>.lock`` beside the entry, with the holder's
  pid and host written in it, and removes it on release. The kernel drops the flock when its holder
  dies (killed, crashed), so a waiting process then takes over; a lock file's existence means nothing.
  A waiter names the holder and the lock file, gives up after ``cache_lock_timeout`` seconds (a holder
  stopped with SIGSTOP would otherwise be waited for forever), and takes over a lock still held after
  its holder's pid is gone (a child the holder forked keeps the flock). Under the lock, temporary files
  a killed build left are removed. Where flock is unavailable (no ``fcntl``, a filesystem without
  locks) builds run unlocked: still atomic, only possibly done twice.
- A full disk: ``atomic_output`` turns ENOSPC / EDQUOT into one ``OSError`` naming the folder, the free
  space and (when known) the bytes needed, and removes the temporary file; :func:`preallocate` reserves
  a memory-mapped file's blocks before any write (a write into a sparse file on a full disk is SIGBUS).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from logging import getLogger

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

__all__ = [
    "DiskFull", "atomic_output", "build_lock", "disk_full", "lock_path", "preallocate", "set_lock_timeout",
    "temp_path", "write_json_atomic",
]

_warned_unlocked = False
_lock_timeout: float | None = 3600.0  # cache_lock_timeout (overall.yaml); set_lock_timeout


def temp_path(path: str) -> str:
    """A temporary name beside ``path``, unique to this process and call."""
    return f"{path}.{os.getpid()}-{secrets.token_hex(4)}.tmp"


def lock_path(path: str) -> str:
    """The lock file of the cache entry ``path`` (hidden, beside it)."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.lock")


class DiskFull(OSError):
    """No space left for a file being written: one line, the folder and the bytes (the CLI prints it)."""


def disk_full(path: str, needed: int | None = None) -> DiskFull:
    folder = os.path.dirname(os.path.abspath(path))
    try:
        free = f"{shutil.disk_usage(folder).free:,} bytes free"
    except OSError:
        free = "free space unknown"
    need = f"{needed:,} bytes needed, " if needed else ""
    name = re.sub(r"\.\d+-[0-9a-f]{8}\.tmp$", "", os.path.basename(path))  # the file, not its temp_path
    return DiskFull(
        f"disk full writing {name} in {folder} ({need}{free}): free space there, or point "
        "cache_dir (or checkpoint_dir) to a disk with room; nothing half-written was kept."
    )


def _is_disk_full(err: BaseException, path: str) -> bool:
    """ENOSPC / EDQUOT, or a library's own write error (torch.save: 'file write failed') while the folder
    has (almost) no space left."""
    if isinstance(err, DiskFull):
        return False  # already worded
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(err, RuntimeError):
        try:
            return shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < 1 << 20
        except OSError:
            return False
    return False


def preallocate(path: str, nbytes: int | None = None) -> None:
    """Reserve the blocks of ``path`` (its whole size by default) before it is memory-mapped and written:
    writing into a sparse file's hole on a full disk kills the process with SIGBUS, no message. Raises
    :class:`DiskFull` (naming the bytes) if the space is not there."""
    nbytes = os.path.getsize(path) if nbytes is None else nbytes
    if hasattr(os, "posix_fallocate"):
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, nbytes)
            return
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise disk_full(path, nbytes) from None
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
        finally:
            os.close(fd)
    # No fallocate here (macOS, some filesystems): a free-space check is the best there is.
    try:
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    except OSError:
        return
    if free < nbytes:
        raise disk_full(path, nbytes)


@contextmanager
def atomic_output(path: str, needed: int | None = None) -> Iterator[str]:
    """Yield a temporary path to write; on success it replaces ``path`` atomically, on an error it is
    removed and ``path`` stays as it was. A full disk is raised as :class:`DiskFull` (``needed``: the
    bytes the file needs, for the message)."""
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except Exception as err:
        if _is_disk_full(err, tmp):
            raise disk_full(path, needed) from None
        raise
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


def set_lock_timeout(seconds) -> None:
    """How long :func:`build_lock` waits for another process's build (``cache_lock_timeout``, seconds;
    None: no limit). Set once per run from the config (:class:`ItemModalityStore` does)."""
    global _lock_timeout
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0):
        raise ValueError(
            f"cache_lock_timeout must be a number of seconds >= 0 (or ~ to wait without limit), got {seconds!r}."
        )
    _lock_timeout = None if seconds is None else float(seconds)


def _holder(lock: str) -> tuple[int | None, str | None]:
    """(pid, host) that the holder of ``lock`` wrote into it; (None, None) if not (yet) written."""
    try:
        with open(lock) as f:
            pid, host = f.read(200).split()[:2]
        return int(pid), host
    except (OSError, ValueError):
        return None, None


def _process_state(pid: int) -> str:
    """'gone', 'stopped' (SIGSTOP, Ctrl-Z; Linux only) or 'running' (pid reuse aside)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "gone"
    except PermissionError:
        pass  # exists, another user's
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return "stopped" if state in ("T", "t") else "running"
    except (OSError, IndexError):
        return "running"


def _same_file(fd: int, path: str) -> bool:
    """Whether ``fd`` is still the file at ``path`` (a holder that finished removed it: lock afresh)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def _acquire(lock: str, what: str) -> int:
    """An fd of ``lock`` holding its exclusive flock, our pid and host written in it. Waits (one log line
    naming the holder) for ``_lock_timeout`` seconds, then raises TimeoutError naming the holder; a holder
    whose process is gone (on this host) while its lock is still held (by a child it forked) is taken
    over."""
    logger = getLogger()
    deadline = None if _lock_timeout is None else time.monotonic() + _lock_timeout
    announced, pause, gone = False, 0.05, None
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, host = _holder(lock)
            state = _process_state(pid) if pid is not None and host == socket.gethostname() else "unknown"
            holder = f"process {pid} on {host}" if pid is not None else "another process"
            # Gone twice in a row: a new holder writes its pid right after locking the file a dead one left.
            if state == "gone" and gone == pid and _same_file(fd, lock):
                logger.warning(f"{holder}, which held {lock}, is gone: taking over the build of {what}.")
                os.close(fd)
                with contextlib.suppress(FileNotFoundError):  # another waiter may have taken over first
                    os.unlink(lock)
                continue
            gone = pid if state == "gone" else None
            os.close(fd)
            if not announced:
                announced = True
                limit = "no limit" if deadline is None else f"up to {_lock_timeout:g} s, cache_lock_timeout"
                logger.info(f"Waiting for {holder}, which is building {what} (lock {lock}; {limit}) ...")
            if deadline is not None and time.monotonic() >= deadline:
                stopped = f" It is stopped (SIGSTOP or Ctrl-Z): `kill -CONT {pid}` resumes it." * (state == "stopped")
                raise TimeoutError(
                    f"gave up after {_lock_timeout:g} s (cache_lock_timeout) waiting for {holder}, which holds {lock} "
                    f"while building {what}.{stopped} Wait for it and run again, stop it, or use another cache_dir."
                ) from None
            time.sleep(pause if deadline is None else max(0.0, min(pause, deadline - time.monotonic())))
            pause = min(pause * 2, 1.0)
            continue
        except BaseException:
            os.close(fd)
            raise
        if not _same_file(fd, lock):  # removed by the holder we waited for, after we opened it
            os.close(fd)
            continue
        try:  # who holds it, for a waiter's message; a full disk must not cost the lock itself
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        except OSError:
            pass
        return fd


@contextmanager
def build_lock(path: str, outputs: Iterable[str] = (), what: str | None = None) -> Iterator[bool]:
    """Hold the exclusive lock of the cache entry ``path`` (waiting as :func:`_acquire` says: ``what``
    names the entry). Yields whether the lock is held (False where flock is unavailable). Under the
    lock, leftover temporary files of ``outputs`` are removed first; on release the lock file is too."""
    global _warned_unlocked
    fd = None
    lock = lock_path(path)
    if fcntl is not None:
        try:
            fd = _acquire(lock, what or path)
        except OSError as err:
            if isinstance(err, TimeoutError):
                raise
            # a read-only cache_dir, a filesystem without flock
            if not _warned_unlocked:
                _warned_unlocked = True
                getLogger().warning(
                    f"Cannot lock cache files in {os.path.dirname(path) or '.'} ({err}): runs sharing this "
                    "cache_dir may build the same cache twice (each write is still atomic)."
                )
    try:
        if fd is not None:
            _remove_stale_temps(outputs)
        yield fd is not None
    finally:
        if fd is not None:
            try:
                os.unlink(lock)  # while held: a waiter that opened it sees it is gone and locks afresh
            except OSError:
                pass
            os.close(fd)  # releases the flock
