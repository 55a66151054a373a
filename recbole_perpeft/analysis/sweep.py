"""PerPEFT over several numbers of groups (paper Fig. 7b): train (or reuse) one run per ``n_groups`` and plot
the metrics against n.

    recbole-perpeft analyze sweep --dataset=ml-100k --n_groups=2,4,8,16 [--model=PerPEFT]
        [--out=sweep-ml-100k] [--config_files=...] [--key=value ...]

Each run goes through :func:`recbole_perpeft.quick_start.run` and writes ``OUT/runs/<model>-n<n>-seed<s>.json``
(its result JSON) and ``...log`` (its log lines, for the training curves). Running the command again reuses
every finished run (same model, dataset, seed and n_groups) and trains only the missing ones. Stage 1
(GlobalPEFT) does not depend on n_groups: the first run trains it and the others start from its checkpoint
(``global_checkpoint``), unless ``--global_checkpoint`` is given. ``OUT/sweep.json`` / ``sweep.md`` hold the
valid and test metrics per n, ``sweep.png`` the plot, ``curves-n<n>.png`` each run's curves."""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

from recbole_perpeft.analysis import plots
from recbole_perpeft.analysis.curves import parse_log


def parse_counts(value) -> list[int]:
    """'2,4,8,16' (or a list) -> [2, 4, 8, 16]; each a distinct positive integer."""
    items = value if isinstance(value, (list, tuple)) else str(value).replace(" ", "").split(",")
    try:
        counts = [int(v) for v in items if str(v) != ""]
    except ValueError:
        raise ValueError(f"--n_groups must be comma-separated integers such as 2,4,8,16, got {value!r}.") from None
    if not counts or any(n < 1 for n in counts) or len(set(counts)) != len(counts):
        raise ValueError(f"--n_groups must list distinct positive integers (e.g. 2,4,8,16), got {value!r}.")
    return sorted(counts)


def finished(path: Path, model: str, dataset: str, n_groups: int, seed: int) -> dict | None:
    """The result JSON at ``path`` if it is a finished run of this sweep point, else None."""
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
        config = result["config"]
        same = (
            result["model"] == model
            and str(result["dataset"]) == str(dataset)
            and int(config["n_groups"]) == n_groups
            and int(config["seed"]) == seed
            and isinstance(result.get("test_result"), dict)
        )
    except (OSError, ValueError, KeyError, TypeError):
        same = False
    return result if same else None


class LogCapture(logging.Handler):
    """The root logger's records of one run, as plain lines in a file (RecBole's own log file is set up
    once per process, so runs of one sweep would share it)."""

    def __init__(self, path: Path):
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s  %(message)s"))
        self.file = open(path, "w")  # noqa: SIM115 - closed in close()

    def emit(self, record):
        self.file.write(self.format(record) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()
        super().close()


@contextmanager
def captured_log(path: Path, model, dataset, config_file_list, config_dict):
    """The run's INFO records into ``path``. RecBole sets up its console and file logging (``init_logger``)
    only while the root logger has no handler: it is done here first, as the run would, so that adding the
    capture does not switch it off; the root level is lowered to INFO meanwhile (the console keeps the
    run's ``state``)."""
    from recbole.utils import init_logger

    from recbole_perpeft.config import Config

    root = logging.getLogger()
    if not root.handlers:
        init_logger(Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict))
    capture, level = LogCapture(path), root.level
    root.addHandler(capture)
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(capture)
        root.setLevel(level)
        capture.close()


def sweep(
    dataset: str, n_groups, model: str = "PerPEFT", out_dir=None, config_file_list=None, overrides: dict | None = None
) -> dict:
    """Run or reuse ``model`` for every n in ``n_groups``; write sweep.json, sweep.md and the plots."""
    from recbole_perpeft.compare import config_seed, is_grouped
    from recbole_perpeft.quick_start import run, write_json

    counts = parse_counts(n_groups)
    if not is_grouped(model):
        raise ValueError(f"--model={model} has no interest groups to sweep: use PerPEFT (or another two-stage model).")
    overrides = {k: v for k, v in (overrides or {}).items() if k != "n_groups"}
    seed = config_seed(model, dataset, config_file_list, overrides)
    out = Path(out_dir or f"sweep-{dataset}")
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    stage1 = overrides.get("global_checkpoint")
    results, logs = {}, {}
    for n in counts:
        stem = runs_dir / f"{model}-n{n}-seed{seed}"
        path, log = stem.with_suffix(".json"), stem.with_suffix(".log")
        result = finished(path, model, dataset, n, seed)
        if result is None:
            print(
                f"[sweep] {model} n_groups={n} seed {seed}" + (f" (stage 1 from {stage1})" if stage1 else ""),
                flush=True,
            )
            config_dict = {**overrides, "n_groups": n, "seed": seed}
            if stage1:
                config_dict["global_checkpoint"] = stage1
            with captured_log(log, model, dataset, config_file_list, config_dict):
                result = run(model, dataset, config_file_list, config_dict=config_dict, result_file=str(path))
            if not path.is_file():
                write_json(str(path), result)
        else:
            print(f"[sweep] n_groups={n}: reusing {path}", flush=True)
        if not stage1 and result.get("global_checkpoint") and os.path.isfile(str(result["global_checkpoint"])):
            stage1 = str(result["global_checkpoint"])
        results[n], logs[n] = result, log
    return write_sweep(out, model, dataset, seed, results, logs)


def write_sweep(out: Path, model: str, dataset: str, seed: int, results: dict, logs: dict) -> dict:
    """sweep.json, sweep.md, sweep.png and per-run curves from the runs' results and logs."""
    counts = sorted(results)
    metrics = sorted(set.intersection(*(set(results[n]["test_result"]) for n in counts)))
    summary = {
        "model": model,
        "dataset": dataset,
        "seed": seed,
        "metrics": metrics,
        "runs": {
            str(n): {
                "n_groups_used": (results[n].get("groups") or {}).get("n_groups", n),
                "group_sizes": (results[n].get("groups") or {}).get("sizes"),
                "valid": results[n].get("best_valid_result"),
                "test": results[n]["test_result"],
                "result_file": str(out / "runs" / f"{model}-n{n}-seed{seed}.json"),
            }
            for n in counts
        },
    }
    (out / "sweep.json").write_text(json.dumps(summary, indent=2))
    lines = [
        f"# {model} on {dataset} (seed {seed}) by number of groups",
        "",
        "| n_groups | groups used | " + " | ".join(f"test {m}" for m in metrics) + " |",
        "|---:|---:|" + "---:|" * len(metrics),
    ]
    for n in counts:
        row = summary["runs"][str(n)]
        lines.append(f"| {n} | {row['n_groups_used']} | " + " | ".join(f"{row['test'][m]:.4f}" for m in metrics) + " |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    points = {f"test {m}": (counts, [results[n]["test_result"][m] for n in counts]) for m in metrics}
    valid_metrics = [m for m in metrics if all(m in (results[n].get("best_valid_result") or {}) for n in counts)]
    points.update({f"valid {m}": (counts, [results[n]["best_valid_result"][m] for n in counts]) for m in valid_metrics})
    plots.metric_vs_groups(points, str(out / "sweep.png"), f"{model} on {dataset}: metrics by n_groups")
    for n in counts:
        if logs.get(n) and Path(logs[n]).is_file():
            curves = parse_log(Path(logs[n]).read_text())
            if curves:
                metric = (results[n].get("config") or {}).get("valid_metric")
                plots.training_curves(
                    curves,
                    str(out / f"curves-n{n}.png"),
                    f"{model}, n_groups={n}",
                    metric=str(metric).lower() if metric else None,
                )
    print("\n".join(lines), flush=True)
    return summary
