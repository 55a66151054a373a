"""Per-epoch training curves and the cost of a run, from what runs write.

A result JSON (``--result_file``) holds the seconds of every training epoch (``seconds.per_epoch``; two-stage
models ``stage1_per_epoch`` and ``stage2_per_epoch``) and the trainable parameters, but not the loss or the
validation metrics per epoch: those are in the run's log (RecBole writes ``log/<model>/<model>-<dataset>-
<time>-<hash>.log``; ``analyze sweep`` keeps one per run beside its result JSON). :func:`parse_log` reads
RecBole's epoch lines:

    epoch 0 training [time: 101.52s, train loss: 40.1234]
    epoch 0 evaluating [time: 3.41s, valid_score: 0.075300]
    valid result:
    hit@20 : 0.0541    hit@30 : 0.0753    ndcg@20 : 0.0185    ndcg@30 : 0.0228

and splits them into stages at the two-stage trainer's "Stage 1: ..." / "Stage 2: ..." lines."""

from __future__ import annotations

import re

import numpy as np

TRAIN = re.compile(r"epoch (\d+) training \[time: ([\d.]+)s, (.*)\]")
LOSS = re.compile(r"train[_ ]loss\d*: (-?[\d.]+(?:e-?\d+)?|nan|inf)")
EVAL = re.compile(r"epoch (\d+) evaluating \[time: ([\d.]+)s, valid_score: (-?[\d.]+)\]")
METRIC = re.compile(r"([A-Za-z_]+@\d+) : (-?[\d.]+)")
STAGE = re.compile(r"Stage ([12]): (\w+)(?:, \d+ epochs(?:, weight_decay ([^ ]+))?)?")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _stage(curves: dict, name: str) -> dict:
    return curves.setdefault(name, {"epoch": [], "train_loss": [], "seconds": [], "valid_score": [], "valid": {}})


def parse_log(text: str) -> dict:
    """{stage: {"epoch", "train_loss", "seconds", "valid_score": [...], "valid": {metric: [...]}}}; one
    stage "training" for a single-stage run. Validation lists hold NaN for epochs without validation."""
    curves: dict = {}
    stage = "training"
    pending_valid = None  # the epoch whose "valid result:" metrics come on the next line
    for line in ANSI.sub("", text).splitlines():
        marker = STAGE.search(line)
        if marker:
            number, model, weight_decay = marker.groups()
            stage = f"stage {number} ({model}{', wd ' + weight_decay if weight_decay else ''})"
            continue
        train = TRAIN.search(line)
        if train:
            values = _stage(curves, stage)
            epoch = int(train.group(1))
            if epoch in values["epoch"]:  # a resumed run repeats an epoch: keep the latest
                _drop_from(values, values["epoch"].index(epoch))
            losses = [float(v) for v in LOSS.findall(train.group(3))]
            values["epoch"].append(epoch)
            values["train_loss"].append(sum(losses) if losses else float("nan"))
            values["seconds"].append(float(train.group(2)))
            values["valid_score"].append(float("nan"))
            for series in values["valid"].values():
                series.append(float("nan"))
            continue
        evaluation = EVAL.search(line)
        if evaluation and stage in curves and int(evaluation.group(1)) in curves[stage]["epoch"]:
            values = curves[stage]
            pending_valid = values["epoch"].index(int(evaluation.group(1)))
            values["valid_score"][pending_valid] = float(evaluation.group(3))
            continue
        metrics = METRIC.findall(line)
        if metrics and pending_valid is not None and "test result" not in line:
            values = curves[stage]
            for name, value in metrics:
                series = values["valid"].setdefault(name, [float("nan")] * len(values["epoch"]))
                series[pending_valid] = float(value)
            pending_valid = None
    return _plain_stage_names(curves)


def _plain_stage_names(curves: dict) -> dict:
    """Name the weight decay of stage 2 only where the log holds several stage-2 runs (weight_decay_grid)."""
    second = [name for name in curves if name.startswith("stage 2")]
    if len(second) != 1:
        return curves
    return {re.sub(r", wd [^)]*", "", name) if name in second else name: values for name, values in curves.items()}


def _drop_from(values: dict, index: int) -> None:
    for key in ("epoch", "train_loss", "seconds", "valid_score"):
        del values[key][index:]
    for series in values["valid"].values():
        del series[index:]


def from_result(result: dict) -> dict:
    """Seconds per training epoch, per stage, from a result JSON (the only per-epoch values it holds)."""
    seconds = result.get("seconds") or {}
    stages = {
        "stage 1 (GlobalPEFT)": seconds.get("stage1_per_epoch"),
        f"stage 2 ({result.get('model')})": seconds.get("stage2_per_epoch"),
        "training": seconds.get("per_epoch"),
    }
    curves = {}
    for name, values in stages.items():
        if values:
            curves[name] = {"epoch": list(range(len(values))), "seconds": [float(v) for v in values]}
    return curves


def epoch_seconds(result: dict) -> dict:
    """{stage label ("" for a single-stage run): mean seconds per training epoch}."""
    seconds = result.get("seconds") or {}
    found = {}
    for key, label in (("stage1_per_epoch", "stage 1"), ("stage2_per_epoch", "stage 2"), ("per_epoch", "")):
        values = seconds.get(key)
        if values:
            found[label] = float(np.mean(values))
    return found


def cost_rows(results: list[dict]) -> list[dict]:
    """Per result JSON: a label, trainable parameters (group-specific vs shared) and seconds per epoch."""
    rows = []
    for result in results:
        parameters = result.get("trainable_parameters") or {}
        if "total" not in parameters:
            raise ValueError(
                f"a {result.get('model')} result has no trainable_parameters.total: give result JSONs "
                "written by recbole_perpeft runs (--result_file)."
            )
        grouped = sum(v for k, v in parameters.items() if k.startswith("group_specific/") and isinstance(v, int))
        config = result.get("config") or {}
        details = [str(config["peft_type"])] if config.get("peft_type") else []
        if (result.get("groups") or {}).get("n_groups"):
            details.append(f"{result['groups']['n_groups']} groups")
        lines = [str(result.get("model")), ", ".join(details)]
        if config.get("seed") is not None:
            lines.append(f"seed {config['seed']}")
        label = "\n".join(line for line in lines if line)
        rows.append(
            {
                "label": label,
                "model": result.get("model"),
                "parameters": {
                    "total": int(parameters["total"]),
                    "group_specific": int(grouped),
                    "shared": int(parameters["total"]) - int(grouped),
                },
                "epoch_seconds": epoch_seconds(result),
            }
        )
    return rows
