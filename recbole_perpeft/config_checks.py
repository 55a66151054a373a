"""Checks of a whole run's config, made once when the ``Config`` is built (before any data is read or
anything trains), each ending in one ValueError that names the key, what it must be and what was given:

* every numeric key against its declared type and range (``config_values.NUMERIC_KEYS``), and any other
  key whose default is a number against "a finite number" (``--epochs=ten``, ``--learning_rate=nan``);
* ``valid_metric`` against the metrics the run computes (``metrics`` x ``topk``): RecBole would train an
  epoch, then fail on a missing dictionary key;
* a GPU asked for (``--device=cuda``, an explicit ``gpu_id``): read here, checked once the device is set.
"""

from __future__ import annotations

import math
import numbers

from recbole.evaluator.base_metric import TopkMetric
from recbole.evaluator.register import metrics_dict

from recbole_perpeft.config_values import NUMERIC_KEYS, Number

# Numeric by default but read as text by their own checks (a GPU list, the launcher's keys: launch.py).
NOT_NUMBERS = {"gpu_id", "nproc", "world_size", "ip", "port", "offset", "local_rank"}
ANY_NUMBER = Number(float)


def check_numbers(cfg: dict, defaults: dict, given: dict) -> None:
    """Every key of ``NUMERIC_KEYS`` the run has, and every key the user set (``given``) whose default
    (``defaults``: the property files') is a number; int keys given as integral floats become ints."""
    for key, spec in NUMERIC_KEYS.items():
        if key in cfg:
            cfg[key] = spec.check(key, cfg[key])
    for key in given:
        default = defaults.get(key)
        if key in NUMERIC_KEYS or key in NOT_NUMBERS or key not in cfg:
            continue
        if isinstance(default, numbers.Real) and not isinstance(default, bool) and math.isfinite(default):
            ANY_NUMBER.check(key, cfg[key])
    topk = cfg.get("topk")
    topk = [topk] if isinstance(topk, int) and not isinstance(topk, bool) else topk
    if not isinstance(topk, list) or not topk:
        raise ValueError(f"topk must be a list of positive integers such as [20, 30], got {cfg.get('topk')!r}.")
    cfg["topk"] = [Number(int, 1).check("topk", k) for k in topk]


def computed_metrics(cfg: dict) -> list[str]:
    """The names RecBole's evaluator gives its results: ``<metric>@<k>`` for a top-k metric, the
    metric's name for the others (auc, mae, ...); a metric RecBole lacks is left to RecBole to refuse."""
    metrics = cfg.get("metrics") or []
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    names = []
    for metric in map(str, metrics):
        kind = metrics_dict.get(metric.lower())
        if kind is None or issubclass(kind, TopkMetric):
            names += [f"{metric.lower()}@{k}" for k in cfg["topk"]]
        if kind is None or not issubclass(kind, TopkMetric):
            names.append(metric.lower())
    return names


def check_valid_metric(cfg: dict) -> None:
    given = cfg.get("valid_metric")
    computed = computed_metrics(cfg)
    if not isinstance(given, str) or given.lower() not in computed:
        name, _, k = str(given).lower().partition("@")
        hint = f" add {k} to topk (--topk=[...,{k}])" if k and f"{name}@{cfg['topk'][0]}" in computed else ""
        raise ValueError(
            f"valid_metric {given!r} is not among the metrics this run computes ({', '.join(computed)}; "
            f"metrics={cfg.get('metrics')}, topk={cfg['topk']}): choose one of them, or{hint or ' add it to metrics'}."
        )


def requested_device(given: dict) -> str | None:
    """What the user asked for explicitly: ``"cpu"`` (``--device=cpu`` or ``--use_gpu=False``), a GPU
    (the words naming it, e.g. ``"--gpu_id=0"``), or None (RecBole's defaults: CUDA where there is one)."""
    device = given.get("device")
    if device is not None:
        text = str(device).strip().lower()
        if text == "cpu":
            return "cpu"
        if text.split(":")[0] not in ("cuda", "gpu"):
            raise ValueError(f"device must be cpu or cuda (cuda:N), got {device!r}.")
        return f"--device={device}"
    if given.get("use_gpu") is False or str(given.get("use_gpu")).lower() == "false":
        return "cpu"
    gpu_id = given.get("gpu_id")
    if gpu_id is not None and str(gpu_id).strip() not in ("", "()", "[]"):
        return f"--gpu_id={gpu_id}"
    return None
