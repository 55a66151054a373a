"""Run a comparison's runs side by side on one machine (``--jobs=N``): each run a subprocess.

:func:`run_parallel` takes what :func:`recbole_perpeft.compare.run_rows` would train one after another (rows x
seeds) and runs up to ``jobs`` of them at once, each as ``python -m recbole_perpeft.experiments.executor SPEC``
(:func:`main`: one planned run through :func:`recbole_perpeft.quick_start.run`, exactly the call ``--jobs=1`` makes
in-process, so each run's result is the same, bit for bit on a CPU, as long as the thread count is). On a CPU each
run gets ``cores // jobs`` torch threads (``OMP_NUM_THREADS`` and ``torch.set_num_threads``).

- Plan and dependencies: finished runs (their JSON there) are reused as by ``--jobs=1``. A two-stage row's seed
  shares one stage 1 per set of stage-1 settings (compare.stage1_key): the first such row of a seed that has no
  finished stage 1 trains it, the seed's later rows with the same key wait for it and start from its
  ``global_checkpoint``.
- Files beside each run's JSON ``<label>-seed<s>.json``: ``.log`` (the run's whole output, appended per attempt)
  and ``.checkpoint`` (the checkpoint file the run writes, reported as it starts). A run killed midway (the
  whole command interrupted, or the machine stopped) is resumed, when the command is run again, from the later
  of that checkpoint and its ``-last`` companion (or the stage-1 ones of a two-stage run): recbole_perpeft/resume.py.
  A run that failed with an error starts afresh when retried (the error may have been fixed in between).
- Output: one line when a run starts and one when it ends, with the overall count; at the end, the runs that
  failed with the last line of their log and the command to retry them (the same command: finished runs are
  reused). A failing run does not stop the others (only the rows waiting on its stage 1).

Why no engine (Ray, Dask, joblib) here: on one machine a run is a process started, waited for and read back
from its JSON; ``subprocess`` does that, and the plan's only dependency (stage 1 before stage 2) is a wait on one
other run. An engine adds a dependency and a scheduler process for nothing one machine needs; running the same
runs over several machines is what an engine is for, and comes as a separate executor."""

from __future__ import annotations

import base64
import os
import pickle
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

POLL_SECONDS = 0.2


@dataclass
class Planned:
    """One run to train: its row, seed, result file and the ``quick_start.run`` keywords."""

    label: str
    model: str
    seed: int
    path: Path
    config_dict: dict
    provider: Planned | None = None  # the run training this run's stage 1 (wait for it)
    stage1_from: str | None = None  # the shared stage-1 checkpoint it starts from
    proc: subprocess.Popen | None = None
    started: float = 0.0
    error: str | None = None  # why it failed (None: not failed)
    result: dict | None = None

    @property
    def name(self) -> str:
        return f"{self.label} seed {self.seed}"


def side_file(path: Path, suffix: str) -> Path:
    """``runs/PerPEFT-seed1.json`` -> ``runs/PerPEFT-seed1<suffix>``."""
    return Path(path).with_suffix(suffix)


def threads_per_run(jobs: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // jobs)


def resume_file(path: Path) -> str | None:
    """The checkpoint an interrupted run of ``path`` resumes from (see the module docstring), or None."""
    from recbole_perpeft.resume import last_checkpoint_path, resume_source

    record = side_file(path, ".checkpoint")
    if not record.is_file():
        return None
    best = record.read_text().strip()
    stem, ext = os.path.splitext(best)
    for candidate in (best, f"{stem}-stage1-GlobalPEFT{ext}"):  # stage 2 (or one stage) first, then stage 1
        if os.path.isfile(candidate) or os.path.isfile(last_checkpoint_path(candidate)):
            return resume_source(candidate)
    return None


def retry_command() -> str:
    argv = list(sys.argv)
    return shlex.join([Path(sys.executable).name, *argv] if argv[0].endswith(".py") else argv)


def run_rows_parallel(rows, grouped: dict, dataset: str, seed_list, runs_dir, config_file_list, overrides: dict,
                      log: str, sharing, user_global: bool, jobs: int, store) -> tuple[dict, dict]:
    """compare.run_rows with ``jobs`` runs at once: the same reuse and stage-1 sharing, the same return value.
    ``store``: the module that holds the run-reuse rules (recbole_perpeft.compare, which passes itself), given
    rather than imported so that compare -> executor stays the only import between the two."""
    _given, changed_values, describe_changes = store._given, store.changed_values, store.describe_changes
    finished_stage1, load_run, run_file, stage1_key = (store.finished_stage1, store.load_run, store.run_file,
                                                       store.stage1_key)  # fmt: skip

    plan, results, done, total = [], {}, 0, len(rows) * len(seed_list)
    for seed in seed_list:
        stage1 = {} if user_global else finished_stage1(sharing, dataset, seed, runs_dir, overrides)
        for row in rows:
            done += 1
            row_overrides = {**overrides, **row.overrides}
            key, path = stage1_key(row_overrides), run_file(runs_dir, row.label, seed)
            shares = grouped[row.model] and not user_global
            result = load_run(path, row.model, dataset, seed)
            if result is not None:
                print(f"[{log}] run {done} of {total}: {row.label} seed {seed}: reusing {path}", flush=True)
                changed = changed_values(result, row_overrides)
                if changed:
                    print(f"[{log}] warning: {path} was run with {', '.join(describe_changes(changed))}; delete it "
                          "to redo it")  # fmt: skip
                results[(row.label, seed)] = result
                checkpoint = result.get("global_checkpoint")
                if shares and key not in stage1 and _given(checkpoint) and os.path.isfile(str(checkpoint)):
                    stage1[key] = str(checkpoint)
                continue
            run = Planned(row.label, row.model, seed, path, {**row_overrides, "seed": seed})
            if shares and isinstance(stage1.get(key), Planned):
                run.provider = stage1[key]  # wait for the run that trains this seed's stage 1
            elif shares and key in stage1:
                run.config_dict["global_checkpoint"] = run.stage1_from = stage1[key]
            elif shares:
                stage1[key] = run  # this run trains it
            plan.append(run)
    if plan:
        results.update(run_parallel(plan, dataset, config_file_list, jobs, log, load_run))
    runs = {row.label: {s: str(run_file(runs_dir, row.label, s)) for s in seed_list} for row in rows}
    test_results = {row.label: {s: results[(row.label, s)]["test_result"] for s in seed_list} for row in rows}
    return runs, test_results


def run_parallel(plan: list[Planned], dataset: str, config_file_list, jobs: int, log: str, load_run) -> dict:
    """Run ``plan`` with up to ``jobs`` at once; return {(label, seed): result}. Raises RunsFailed (after every
    other run has ended) naming the failed runs."""
    threads = threads_per_run(jobs)
    print(f"[{log}] {len(plan)} runs to train, {jobs} at a time ({threads} torch thread(s) each); a log per run "
          f"beside its JSON", flush=True)  # fmt: skip
    # RecBole's init_logger makes ./log/ and ./log/<model>/ with a check-then-create (utils.ensure_dir): two runs
    # starting at once in a fresh folder race on it (FileExistsError), so the folders exist before any starts.
    for model in {run.model for run in plan} | {"GlobalPEFT"}:  # (GlobalPEFT: a two-stage run's stage 1)
        os.makedirs(os.path.join("log", model), exist_ok=True)
    pending, running, ended = list(plan), [], []
    try:
        while pending or running:
            for run in [r for r in pending if r.provider is not None and r.provider.error]:
                run.error = f"its seed's stage 1 ({run.provider.name}) failed"
                pending.remove(run)
                ended.append(run)
                _report_end(run, log, ended, plan)
            ready = [r for r in pending if r.provider is None or r.provider.result is not None]
            if pending and not ready and not running:
                raise RuntimeError("executor: runs wait on a stage 1 that is not planned")  # (a planning bug)
            for run in ready[: jobs - len(running)]:
                pending.remove(run)
                checkpoint = run.provider.result.get("global_checkpoint") if run.provider is not None else None
                if checkpoint and os.path.isfile(str(checkpoint)):  # (else it trains its own, as --jobs=1 would)
                    run.config_dict["global_checkpoint"] = run.stage1_from = str(checkpoint)
                _start(run, dataset, config_file_list, threads, log, len(ended), len(plan))
                running.append(run)
            for run in [r for r in running if r.proc.poll() is not None]:
                running.remove(run)
                ended.append(run)
                _collect(run, dataset, load_run)
                _report_end(run, log, ended, plan)
            if running:
                time.sleep(POLL_SECONDS)
    except BaseException:
        _stop(running)
        raise
    failed = [r for r in plan if r.error]
    if failed:
        print(f"[{log}] {len(failed)} of {len(plan)} runs failed:", flush=True)
        for run in failed:
            print(f"  {run.name}: {run.error}; log {side_file(run.path, '.log')}", flush=True)
        print(f"[{log}] retry them with the same command (finished runs are reused): {retry_command()}", flush=True)
        raise RunsFailed(f"{len(failed)} of {len(plan)} runs failed: " + ", ".join(r.name for r in failed)
                         + "; run the same command again to retry them (finished runs are reused)")  # fmt: skip
    return {(r.label, r.seed): r.result for r in plan}


class RunsFailed(ValueError):
    """Runs of a ``--jobs`` comparison failed (the others finished); the message names them."""


def _start(run: Planned, dataset, config_file_list, threads: int, log: str, ended: int, total: int) -> None:
    import recbole_perpeft

    resume = resume_file(run.path)
    if run.path.is_file():
        run.path.unlink()  # another run's or a broken file: this run's result replaces it
    spec = dict(model=run.model, dataset=dataset, config_file_list=config_file_list, config_dict=run.config_dict,
                result_file=str(run.path), resume=resume, threads=threads)  # fmt: skip
    encoded = base64.b64encode(pickle.dumps(spec)).decode("ascii")
    package_root = str(Path(recbole_perpeft.__file__).resolve().parents[1])  # this copy of the package, not another
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([package_root, *filter(None, [os.environ.get("PYTHONPATH")])])}  # fmt: skip
    log_file = side_file(run.path, ".log")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as out:
        out.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {run.name}" + (f" resumed from {resume}" if resume
                  else "") + "\n")  # fmt: skip
        out.flush()
        run.proc = subprocess.Popen([sys.executable, "-m", "recbole_perpeft.experiments.executor", encoded],
                                    stdout=out, stderr=subprocess.STDOUT, env=env)  # fmt: skip
    run.started = time.monotonic()
    how = f" (resuming {resume})" if resume else ""
    stage1 = f" (stage 1 from {run.stage1_from})" if run.stage1_from else ""
    print(f"[{log}] start {run.name}{how}{stage1}; {ended} of {total} ended", flush=True)


def _collect(run: Planned, dataset: str, load_run) -> None:
    result = load_run(run.path, run.model, dataset, run.seed, quiet=True) if run.proc.returncode == 0 else None
    if result is None:
        run.error = f"exit status {run.proc.returncode}, last log line: {last_line(side_file(run.path, '.log'))}"
        if run.proc.returncode > 0 and run.proc.returncode != 130:  # an error, not an interruption: a retry
            side_file(run.path, ".checkpoint").unlink(missing_ok=True)  # (perhaps with a fix) starts afresh
    else:
        run.result = result


def _report_end(run: Planned, log: str, ended: list, plan: list) -> None:
    failed = sum(1 for r in ended if r.error)
    took = f" in {time.monotonic() - run.started:.1f}s" if run.started else ""
    what = f"FAILED ({run.error})" if run.error else "done"
    print(f"[{log}] {what}: {run.name}{took}; {len(ended)} of {len(plan)} ended ({failed} failed)", flush=True)


def last_line(log_file: Path) -> str:
    try:
        lines = [line.strip() for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"


def _stop(running: list) -> None:
    """Interrupted (Ctrl-C reached the runs too): let them write their checkpoints and end, then stop the rest."""
    deadline = time.monotonic() + 30
    for run in running:
        try:
            run.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            run.proc.kill()


# --- the subprocess: one planned run ------------------------------------------------------------------------


def main(argv=None) -> int:
    """``python -m recbole_perpeft.experiments.executor SPEC``: the one run SPEC describes (written by _start)."""
    spec = pickle.loads(base64.b64decode((argv or sys.argv[1:])[0]))  # noqa: S301 - written by this module's parent
    import torch

    from recbole_perpeft import launch, quick_start
    from recbole_perpeft.resume import TrainingInterrupted

    torch.set_num_threads(spec.pop("threads"))
    record = side_file(Path(spec["result_file"]), ".checkpoint")

    class CheckpointRecord:  # launch.report_checkpoint's channel: the file this run resumes from if killed
        def put(self, message):
            record.write_text(os.path.abspath(message[2]) + "\n")

    launch._reports = CheckpointRecord()
    try:
        result = quick_start.run(**spec)
    except (TrainingInterrupted, KeyboardInterrupt):
        print("interrupted: the comparison, run again, resumes this run", file=sys.stderr)
        return 130
    if not Path(spec["result_file"]).is_file():
        quick_start.write_json(spec["result_file"], result)
    print(f"[executor] written {spec['result_file']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
