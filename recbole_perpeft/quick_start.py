"""Train and evaluate one model on one dataset with RecBole's lower-level API
(``recbole.quick_start`` cannot be imported on today's stack: see compat.py), in one process or, with
``nproc`` / ``world_size``, in several (launch.py, distributed.py)."""

from __future__ import annotations

import json
import os
from logging import getLogger
from time import time

from recbole.utils import dict2str, init_logger, init_seed, set_color

from recbole_perpeft.config import Config
from recbole_perpeft.data import create_dataset, data_preparation
from recbole_perpeft.data.cache_files import atomic_output
from recbole_perpeft.distributed import on_rank0, rank, rank0_first, single_process_view
from recbole_perpeft.launch import launch, launch_settings, report_checkpoint
from recbole_perpeft.quiet import (
    FILE_ONLY,
    console_skips_file_only,
    library_progress_bars,
    log_files,
    silence_known_warnings,
)
from recbole_perpeft.resume import check_checkpoints_fit
from recbole_perpeft.run_checks import check_sequence_length, check_writable_outputs
from recbole_perpeft.trainer import checkpoint_path
from recbole_perpeft.utils import get_model, get_trainer, trainable_parameters_by_component


def json_safe(value):
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_output(path) as tmp, open(tmp, "w") as f:  # two runs writing one file never mix
        json.dump(json_safe(payload), f, indent=2)


def run(model=None, dataset=None, config_file_list=None, config_dict=None, saved=True, result_file=None,
        resume=None) -> dict | None:
    """One run; in ``nproc`` spawned processes when the config asks for more than one (the result is rank
    0's, None on a machine without rank 0)."""
    if "local_rank" not in (config_dict or {}):
        settings = launch_settings(config_file_list, config_dict)
        if settings.spawns:
            kwargs = dict(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict,
                          saved=saved, result_file=result_file, resume=resume)  # fmt: skip
            return launch(run, settings, kwargs)
    silence_known_warnings()
    config = Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
    library_progress_bars(config["show_progress"])
    on_rank0(check_writable_outputs, config, result_file, saved)  # (its refusal reaches every rank: none waits)
    init_seed(config["seed"], config["reproducibility"])
    with rank0_first():  # (RecBole's init_logger creates its folder unguarded against a concurrent process)
        init_logger(config)
    console_skips_file_only()
    logger = getLogger()
    logger.info(config, extra=FILE_ONLY)  # (150 lines: the log file has them)

    with rank0_first():
        dataset = create_dataset(config)
    check_sequence_length(config, dataset)
    fingerprint = check_checkpoints_fit(config, dataset, resume)
    model_class = get_model(config["model"])
    # Every process builds the single process's loaders (the same batches everywhere); the trainer gives
    # each process its share of every batch (distributed.py).
    train_data, valid_data, test_data = data_preparation(single_process_view(config), dataset, model_class)

    init_seed(config["seed"] + rank(), config["reproducibility"])  # (rank 0's initial weights are broadcast)
    outcome = train_and_evaluate(config, model_class, train_data, valid_data, test_data, saved, resume, fingerprint)
    # RecBole's "metric : value" form (an OrderedDict's repr reads np.float64(0.037) under numpy 2)
    logger.info(set_color("best valid ", "yellow") + f": {dict2str(outcome['best_valid_result'])}")
    logger.info(set_color("test result", "yellow") + f": {dict2str(outcome['test_result'])}")
    result = {"model": config["model"], "dataset": config["dataset"], "config": config.final_config_dict, **outcome}
    if result_file and rank() == 0:
        write_json(result_file, result)
        logger.info(f"Result written to {result_file}")
    files = {"checkpoint": outcome["checkpoint"], "log": ", ".join(log_files()) or None}
    logger.info("files: " + "; ".join(f"{k} {v}" for k, v in files.items() if v))
    return json_safe(result)


def train_and_evaluate(config, model_class, train_data, valid_data, test_data, saved, resume,
                       fingerprint=None) -> dict:  # fmt: skip
    """RecBole's fit (best validation checkpoint) and test, with the model's trainer from the registry
    (two-stage models get TwoStageTrainer, whose ``extra_result`` adds the groups and stage timings)."""
    logger = getLogger()
    with rank0_first():  # the item tower may build feature caches
        model = model_class(config, train_data._dataset).to(config["device"])
    logger.info(model, extra=FILE_ONLY)  # (hundreds of lines: the log file has them)
    parameters = trainable_parameters_by_component(model)
    logger.info(set_color("trainable parameters", "blue") + f": {parameters}")
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    trainer.saved_model_file = resume or checkpoint_path(config, config["model"])
    trainer.data_fingerprint = fingerprint
    report_checkpoint(trainer.saved_model_file)  # (the launcher names it if a process dies)
    if resume:
        trainer.resume_checkpoint(resume)
    start = time()
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=config["show_progress"]
    )
    train_seconds = time() - start
    start = time()
    test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=config["show_progress"])
    outcome = {
        "best_valid_score": best_valid_score,
        "best_valid_result": best_valid_result,
        "test_result": test_result,
        "trainable_parameters": parameters,
        "seconds": {
            "train": train_seconds,
            "eval": time() - start,
            "per_epoch": getattr(trainer, "epoch_seconds", None),
        },
        # absolute, so the result file still points at it when read from another directory
        "checkpoint": os.path.abspath(trainer.saved_model_file) if saved else None,
    }
    extra = getattr(trainer, "extra_result", {})
    if "seconds" in extra:
        extra["seconds"]["eval"] = outcome["seconds"]["eval"]
    return {**outcome, **extra}
