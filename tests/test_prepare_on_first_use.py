"""Preparation on first use: building a Config never downloads or writes anything; the first create_dataset
prepares a known dataset (here Amazon Arts, served by a local HTTP server), or says why it cannot; every key
the preparation reads is a config key."""

from __future__ import annotations

from pathlib import Path

import pytest

from recbole_perpeft.data import create_dataset
from recbole_perpeft.data.amazon_download import DatasetUnavailableError
from recbole_perpeft.data.prepare import options_from_config
from tests.amazon_fixtures import CATEGORY, make_amazon_raw, serve_amazon
from tests.tiny import build_config

DATASET = "amazon-arts"  # its real YAML (category Arts_Crafts_and_Sewing), served locally


@pytest.fixture(scope="module")
def raw():
    return make_amazon_raw()


def test_config_never_downloads_create_dataset_prepares(tmp_path, raw):
    """Building a Config (e.g. only to read its seed) touches neither the server nor the disk; the first
    create_dataset prepares the dataset."""
    folder = tmp_path / "data" / DATASET
    with serve_amazon(raw) as server:
        keys = {"data_path": str(tmp_path / "data"), "amazon_base_urls": [server.base_url], "download_images": False}
        config = build_config("SASRec", DATASET, {**keys, "raw_user_sample_ratio": 1.0, "show_progress": False})
        assert server.requests == [] and not folder.exists()
        assert config["data_path"] == str(folder) and config["image_dir"] == str(folder / "images")
        dataset = create_dataset(config)
    assert server.requests and (folder / f"{DATASET}.inter").is_file()
    assert dataset.user_num - 1 == len(raw.sequences)


def test_create_dataset_raises_the_offline_error_and_keeps_the_unknown_dataset_error(tmp_path):
    config = build_config("SASRec", DATASET, {"data_path": str(tmp_path), "download": False})
    with pytest.raises(DatasetUnavailableError, match="download is False"):
        create_dataset(config)
    config = build_config("SASRec", "no-such-dataset", {"data_path": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="not found: no atomic file") as err:
        create_dataset(config)
    assert str(tmp_path / "no-such-dataset" / "no-such-dataset.inter") in str(err.value)


def test_preparation_keys_are_config_keys_with_yaml_defaults(tmp_path):
    """Every key the preparation reads is one a user may set (image_download_workers: overall.yaml)."""
    keys = {"data_path": str(tmp_path), "download": False, "download_images": False, "raw_user_sample_ratio": 0.5}
    config = build_config("SASRec", DATASET, {**keys, "image_download_workers": 3, "seed": 7})
    options = options_from_config(config.final_config_dict, Path(config["data_path"]))
    assert (options.image_workers, options.download, options.images) == (3, False, False)
    assert (options.ratio, options.seed) == (0.5, 7)
    assert (options.category, options.layout) == (CATEGORY, "amazon")
    assert options.raw_dir == tmp_path / DATASET / "raw" and options.image_dir == tmp_path / DATASET / "images"
    default = build_config("SASRec", DATASET, {"data_path": str(tmp_path)})
    assert options_from_config(default.final_config_dict, tmp_path / DATASET).image_workers == 8
