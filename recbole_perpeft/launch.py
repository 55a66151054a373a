"""Starting one run in several processes, with RecBole's keys: ``--nproc=N`` processes on this machine;
across machines, the same command on each with ``--world_size`` (all processes), ``--ip``/``--port`` (the
machine of rank 0) and ``--offset`` (the first rank of this machine's processes). How the processes
train together: recbole_perpeft/distributed.py.

The processes are spawned (each imports torch afresh; CUDA cannot be forked), join the process group in
``Config`` (``compat.init_distributed_device``: gloo on a CPU, NCCL on GPUs) and run ``quick_start.run``.
Rank 0 writes the checkpoints and the result JSON and hands the result back. They die with this process
(SIGKILL included); a Ctrl-C here or at a terminal stops them all at the same training step, and the
run ends as a one-process run would (``TrainingInterrupted`` naming the checkpoint to resume from)."""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import socket
import sys
import time
import traceback
from dataclasses import asdict, dataclass

import torch
import yaml

from recbole_perpeft.distributed import request_stop
from recbole_perpeft.resume import TrainingInterrupted, last_checkpoint_path

LAUNCH_KEYS = ("nproc", "world_size", "ip", "port", "offset")
DEFAULT_PORT = 5678  # RecBole's, for runs across machines (one machine: a free port)
GRACE_SECONDS = 30  # after one process failed, how long the others get to end on their own
EXPECTED_ERRORS = (ValueError, KeyError, FileNotFoundError, OSError, TrainingInterrupted, KeyboardInterrupt)
_reports = None  # in a spawned process: the queue to the launcher (report_checkpoint)


class WorkerDied(RuntimeError):
    """A process of the run ended without a word (killed by a signal, the OOM killer, os._exit): the
    others' errors are only its consequence (a peer gone from a collective). ``checkpoint``: the file
    to resume from, None if none was written yet."""

    def __init__(self, message: str, checkpoint: str | None):
        super().__init__(message)
        self.checkpoint = checkpoint


def report_checkpoint(path: str) -> None:
    """Tell the launcher (if any) which checkpoint this run writes, so that it can name the file to resume
    from if a process dies. (Rank 0's name is every rank's: trainer.checkpoint_path.)"""
    if _reports is not None:
        _reports.put(("checkpoint", -1, path, None))


@dataclass(frozen=True)
class Launch:
    nproc: int = 1
    world_size: int = 1
    ip: str = "localhost"
    port: int = DEFAULT_PORT
    offset: int = 0

    @property
    def spawns(self) -> bool:
        return self.nproc > 1 or self.world_size > 1

    def config_keys(self, local_rank: int) -> dict:
        return {**asdict(self), "local_rank": local_rank}


def _integer(given: dict, key: str, default: int, minimum: int) -> int:
    value = given.get(key, default)
    text = str(value).strip()
    if isinstance(value, bool) or not text.lstrip("-").isdigit() or int(text) < minimum:
        raise ValueError(f"{key} must be an integer of at least {minimum}, got {value!r}.")
    return int(text)


def free_port(ip: str) -> int:
    with socket.socket() as probe:
        probe.bind((ip, 0))
        return probe.getsockname()[1]


def launch_settings(config_file_list=None, config_dict=None) -> Launch:
    """The launch keys from the config files and ``config_dict`` (the command line), checked. Read before
    any ``Config`` is built: the processes build theirs."""
    given = {}
    for file in config_file_list or []:
        try:
            with open(file, encoding="utf-8") as f:
                loaded = yaml.safe_load(f)
        except (OSError, yaml.YAMLError):
            continue  # the processes' Config reports it, naming the file
        if isinstance(loaded, dict):
            given.update({k: loaded[k] for k in LAUNCH_KEYS if k in loaded})
    given.update({k: v for k, v in (config_dict or {}).items() if k in LAUNCH_KEYS and v is not None})
    nproc = _integer(given, "nproc", 1, minimum=1)
    world = _integer(given, "world_size", -1, minimum=-1)
    world = nproc if world in (-1, 0) else world  # RecBole: -1 = this machine's processes
    offset = _integer(given, "offset", 0, minimum=0)
    if offset + nproc > world:
        raise ValueError(f"world_size={world} is too small for offset={offset} + nproc={nproc}: this machine's "
                         f"processes are ranks offset .. offset + nproc - 1 of world_size ranks in all.")
    ip = str(given.get("ip", "localhost"))
    if "port" in given:
        port = _integer(given, "port", DEFAULT_PORT, minimum=1)
    else:  # alone on this machine: any free port; across machines every machine must be told the same one
        port = free_port(ip) if world == nproc else DEFAULT_PORT
    return Launch(nproc=nproc, world_size=world, ip=ip, port=port, offset=offset)


# --- the processes -------------------------------------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """Linux: be killed when the launching process dies (a SIGKILLed run must not leave ranks training)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before prctl
        os._exit(1)


def _picklable(err: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001 - any exception a process raised must reach the launcher somehow
        return RuntimeError(f"{type(err).__name__}: {err}")


def _worker(fn, kwargs: dict, settings: Launch, local_rank: int, parent: int, queue) -> None:
    global _reports
    _reports = queue if local_rank == 0 else None
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, request_stop)
    if "OMP_NUM_THREADS" not in os.environ:  # the machine's cores shared by its processes
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // settings.nproc))
    kwargs = dict(kwargs, config_dict={**(kwargs.get("config_dict") or {}), **settings.config_keys(local_rank)})
    rank = settings.offset + local_rank
    try:
        result = fn(**kwargs)
    except BaseException as err:
        # The launcher prints an unexpected error's traceback, unless a dead peer caused it.
        trace = None if isinstance(err, EXPECTED_ERRORS) else traceback.format_exc()
        queue.put(("raised", rank, _picklable(err), trace))
        sys.exit(1)
    if rank == 0:
        queue.put(("result", rank, result, None))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _supervise(processes: list, queue) -> tuple[list, int, set]:
    """Wait for the processes, reading the queue meanwhile (a process blocks on a full pipe); returns the
    messages, how many Ctrl-C's came and the names of the processes terminated here. A Ctrl-C is passed
    on to them (a second one terminates them)."""
    messages, interrupts, failed_at, terminated = [], 0, None, set()
    while True:
        try:
            while not queue.empty():
                messages.append(queue.get())
            alive = [p for p in processes if p.exitcode is None]
            if not alive:
                break
            if failed_at is None and any(p.exitcode for p in processes):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > GRACE_SECONDS:
                for p in alive:  # still waiting for the failed one in a collective: they would wait for ever
                    terminated.add(p.name)
                    p.terminate()
            multiprocessing.connection.wait([p.sentinel for p in alive], timeout=0.2)
        except KeyboardInterrupt:
            interrupts += 1
            for p in processes:
                if p.exitcode is None:
                    if interrupts > 1:
                        terminated.add(p.name)
                    os.kill(p.pid, signal.SIGINT) if interrupts == 1 else p.terminate()
    for p in processes:
        p.join()
    while not queue.empty():
        messages.append(queue.get())
    return messages, interrupts, terminated


def _dead_worker(processes: list, messages: list, terminated: set, settings: Launch) -> str | None:
    """'rank 1 (pid 123) was killed by SIGKILL' for the first process that ended without a message and
    was not terminated here, else None."""
    spoke = {rank for kind, rank, *_ in messages if kind in ("raised", "result")}
    for local_rank, p in enumerate(processes):
        rank = settings.offset + local_rank
        if not p.exitcode or rank in spoke or p.name in terminated:
            continue
        how = f"was killed by {signal.Signals(-p.exitcode).name}" if p.exitcode < 0 else f"exited with {p.exitcode}"
        return f"rank {rank} (pid {p.pid}) {how}"
    return None


def _resume_file(messages: list) -> str | None:
    """The checkpoint rank 0 reported, if it (or its -last companion) exists yet."""
    reported = [path for kind, _, path, _ in messages if kind == "checkpoint"]
    if not reported:
        return None
    return next((f for f in (last_checkpoint_path(reported[-1]), reported[-1]) if os.path.isfile(f)), None)


def launch(fn, settings: Launch, kwargs: dict):
    """``fn(**kwargs)`` in ``settings.nproc`` spawned processes (their ``config_dict`` gets the launch keys
    and ``local_rank``); returns rank 0's result (None on a machine without rank 0), or raises what the
    processes raised (rank 0's ``TrainingInterrupted``, or the first error)."""
    context = multiprocessing.get_context("spawn")
    queue = context.SimpleQueue()
    processes = [
        context.Process(target=_worker, args=(fn, kwargs, settings, r, os.getpid(), queue),
                        name=f"rank{settings.offset + r}")
        for r in range(settings.nproc)
    ]  # fmt: skip
    for p in processes:
        p.start()
    messages, interrupts, terminated = _supervise(processes, queue)
    dead = _dead_worker(processes, messages, terminated, settings)
    if dead is not None and not interrupts:
        checkpoint = _resume_file(messages)
        raise WorkerDied(f"{dead}; the other processes stopped with it", checkpoint)
    raised = [(rank, err) for kind, rank, err, _ in messages if kind == "raised"]
    for trace in (t for kind, _, _, t in messages if kind == "raised" and t):
        print(trace, file=sys.stderr, end="")
    if raised:
        first = raised[0][1]  # the cause; the others mostly fail because of it (a peer gone from a collective)
        same_on_rank0 = [err for rank, err in raised if rank == 0 and type(err) is type(first)]
        raise same_on_rank0[0] if same_on_rank0 else first
    results = [result for kind, _, result, _ in messages if kind == "result"]
    if results:  # (a Ctrl-C after the last training step: the run ended anyway)
        return results[0]
    if interrupts:
        raise KeyboardInterrupt
    failed = {p.name: p.exitcode for p in processes if p.exitcode}
    if failed:
        raise RuntimeError(f"training processes ended abnormally (exit codes {failed}); see their output above.")
    return None
