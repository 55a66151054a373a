"""create_dataset / data_preparation: RecBole's, with our dataset class and training batches."""

from __future__ import annotations

from logging import getLogger

from recbole.data import create_dataset as recbole_create_dataset
from recbole.data import data_preparation as recbole_data_preparation
from recbole.utils import ModelType

from recbole_perpeft.data.checks import check_enough_items
from recbole_perpeft.data.dataloader import UserSequenceDataLoader
from recbole_perpeft.data.dataset import MultimodalSequentialDataset
from recbole_perpeft.data.sampler import SequenceNegativeSampler


def create_dataset(config):
    if config["MODEL_TYPE"] == ModelType.SEQUENTIAL:
        dataset = MultimodalSequentialDataset(config)
        getLogger().info(dataset)
        return dataset
    if config["user_sample_ratio"] not in (None, 1, 1.0):
        raise ValueError("user_sample_ratio is only supported for sequential models.")
    return recbole_create_dataset(config)


def data_preparation(config, dataset, model_class=None):
    """RecBole's split and evaluation loaders; models that declare ``one_sequence_per_user`` train
    on :class:`UserSequenceDataLoader` instead of RecBole's every-prefix loader.

    Refuses (ValueError), before any training, a dataset with fewer items than the largest top-k,
    which RecBole's evaluation would only crash on after the first epoch."""
    check_enough_items(config, dataset)
    train_data, valid_data, test_data = recbole_data_preparation(config, dataset)
    if getattr(model_class, "one_sequence_per_user", False):
        train_dataset = train_data._dataset
        sampler = SequenceNegativeSampler(train_dataset.item_num, seed=config["seed"])
        train_data = UserSequenceDataLoader(config, train_dataset, sampler, shuffle=config["shuffle"])
    return train_data, valid_data, test_data
