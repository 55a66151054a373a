"""create_dataset / data_preparation: RecBole's, with our dataset class and training batches."""

from __future__ import annotations

import os
from logging import getLogger

from recbole.data import create_dataset as recbole_create_dataset
from recbole.data import data_preparation as recbole_data_preparation
from recbole.utils import ModelType

from recbole_perpeft.data.checks import check_enough_items
from recbole_perpeft.data.dataset import MultimodalSequentialDataset
from recbole_perpeft.data.general_dataset import MultimodalGeneralDataset
from recbole_perpeft.data.history_mask import history_masked_loaders
from recbole_perpeft.data.sampler import SequenceNegativeSampler
from recbole_perpeft.model_paths import model_module


def ensure_dataset_files(config) -> None:
    """Make sure the dataset's atomic files exist: known datasets (Amazon 2023, importable layouts; see
    recbole_perpeft/data/prepare.py) are prepared on first use, here rather than in Config, so that building
    a Config never starts a download. FileNotFoundError when the files are neither there nor preparable."""
    data_path = config["data_path"]  # the dataset's folder: RecBole's Config appends the dataset name
    dataset = config["dataset"]
    inter_file = os.path.join(data_path, f"{dataset}.inter")
    if os.path.isfile(inter_file):
        return
    # Imported only when files are missing: it brings the download and import machinery.
    from recbole_perpeft.data.prepare import ensure_atomic_files

    if not ensure_atomic_files(getattr(config, "final_config_dict", config)):
        raise FileNotFoundError(
            f"Dataset '{dataset}' not found: no atomic file {inter_file}. Put RecBole atomic "
            f"files ({dataset}.inter, {dataset}.item) in {data_path}, or set --data_path; "
            "dataset/README.md lists the datasets we know and how to get them."
        )


def create_dataset(config):
    """Our dataset class for sequential models and our general ones, RecBole's otherwise; a known dataset
    whose files are missing is prepared first (:func:`ensure_dataset_files`)."""
    sequential = config["MODEL_TYPE"] == ModelType.SEQUENTIAL
    ours = sequential or multimodal_general(config)  # (our general models read the same users, items, split)
    if not ours and config["user_sample_ratio"] not in (None, 1, 1.0):
        raise ValueError("user_sample_ratio is only supported for sequential models and ours (LATTICE, BM3).")
    ensure_dataset_files(config)
    if ours:
        dataset = (MultimodalSequentialDataset if sequential else MultimodalGeneralDataset)(config)
        getLogger().info(dataset)
        return dataset
    return recbole_create_dataset(config)


def multimodal_general(config) -> bool:
    """Is the run's model a general model of ours (``recbole_perpeft/model/general_recommender``)?"""
    path = model_module(str(config["model"]))
    return path is not None and ".general_recommender." in path


def data_preparation(config, dataset, model_class=None):
    """RecBole's split and evaluation loaders; our models train on the loader their backbone asks for
    (``model_class.training_loader``: one sequence per user for SASRec, user-item pairs for LightGCN)
    instead of RecBole's every-prefix loader. With ``eval_exclude_history`` the full ranking leaves out
    each user's own past items (data/history_mask.py), for every model, RecBole's included.

    Refuses (ValueError), before any training, a dataset with fewer items than the largest top-k,
    which RecBole's evaluation would only crash on after the first epoch."""
    check_enough_items(config, dataset)
    train_data, valid_data, test_data = recbole_data_preparation(config, dataset)
    valid_data, test_data = history_masked_loaders(config, train_data, valid_data, test_data)  # eval_exclude_history
    if hasattr(model_class, "training_loader"):
        train_dataset = train_data._dataset
        sampler = SequenceNegativeSampler(train_dataset.item_num, seed=config["seed"])
        train_data = model_class.training_loader(config, train_dataset, sampler, shuffle=config["shuffle"])
    return train_data, valid_data, test_data
