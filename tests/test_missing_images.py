"""Missing-modality robustness (beyond the paper, its limitation D.3.3): ``missing_image_ratio`` withholds a
seeded share of the items' images, exactly as if their files were absent, for every adapter family
(frozen features, a peft adapter, a side network) on the tiny text + image pair (MiniLM +
EfficientNet-Lite0); ratio 0 changes nothing; the pixel, frozen-feature and layer-state caches are shared
across ratios."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from recbole_perpeft.data import ItemModalityStore, create_dataset
from recbole_perpeft.data.modality_store import withheld_image_items
from recbole_perpeft.quick_start import run
from tests.tiny import build_config, build_model, make_atomic_dataset, quick_config

DATASET = "missingds"
N_ITEMS = 25
NO_IMAGE_ITEM = "104"  # one item without an image file: 24 items have one


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("missing")
    keys = make_atomic_dataset(root / "data", DATASET, n_users=24, n_items=N_ITEMS, missing_images=(NO_IMAGE_ITEM,))
    text_only = make_atomic_dataset(root / "text", "textonlyds", n_users=24, n_items=N_ITEMS, with_images=False)
    return keys, text_only


def config_keys(tmp_path, data, **extra) -> dict:
    return quick_config(tmp_path, **data[0], topk=[5, 10], valid_metric="hit@10", learning_rate=1e-3, **extra)


def store_for(tmp_path, data, **extra) -> ItemModalityStore:
    config = build_config("GlobalPEFT", DATASET, config_keys(tmp_path, data, **extra))
    return ItemModalityStore(config, create_dataset(config))


# --- which images -----------------------------------------------------------------------------------------


def test_withheld_items_half_of_the_present_ones_rounded_seeded_nested():
    has_image = torch.tensor([False] + [True] * 6 + [False] + [True])  # 7 present
    half = withheld_image_items(has_image, 0.5, seed=1)
    assert int(half.sum()) == 4 and not (half & ~has_image).any()  # 3.5 rounds up, present items only
    assert torch.equal(half, withheld_image_items(has_image, 0.5, seed=1))
    seeds = {tuple(withheld_image_items(has_image, 0.5, seed=s).tolist()) for s in range(6)}
    assert len(seeds) > 1
    quarter = withheld_image_items(has_image, 0.25, seed=1)
    assert int(quarter.sum()) == 2 and not (quarter & ~half).any()  # a larger ratio: a superset
    assert torch.equal(withheld_image_items(has_image, 1.0, seed=1), has_image)
    assert not withheld_image_items(has_image, 0.0, seed=1).any()


def test_store_withholds_half_of_the_present_images_by_seed(tmp_path, data, caplog):
    today = store_for(tmp_path, data)
    pixels, raw = today.image_pixels(16)
    assert int(raw.sum()) == N_ITEMS - 1

    def withheld_mask(**keys):
        store = store_for(tmp_path, data, missing_image_ratio=0.5, **keys)
        store._decode_images = None  # the pixel cache of the ratio-0 store is reused, not decoded again
        again, every_image = store.image_pixels(16)
        assert again.filename == pixels.filename and torch.equal(every_image, raw)  # the same cache, every image
        return store, store.withhold_images(every_image)

    with caplog.at_level(logging.INFO):
        store, has_image = withheld_mask(missing_image_seed=7)
    withheld = store.withheld_images
    assert int(withheld.sum()) == 12 and not (withheld & ~raw).any()
    assert torch.equal(has_image, raw & ~withheld)
    assert "withheld the images of 12 of the 24 items that have one" in caplog.text
    # The same items for the same seed; the run's seed when missing_image_seed is ~; other seeds differ.
    assert torch.equal(withheld_mask(missing_image_seed=7)[1], has_image)
    assert torch.equal(withheld_mask(seed=7)[0].withheld_images, withheld)
    other = withheld_mask(missing_image_seed=8)[0]
    assert int(other.withheld_images.sum()) == 12 and not torch.equal(other.withheld_images, withheld)
    # A cache built from has_image after the withholding would be keyed by it; the image files' part is unchanged.
    source = store.modality_source("image")
    assert source.pop("withheld") == torch.nonzero(withheld).flatten().tolist()
    assert source == today.modality_source("image")
    # Before withholding (what the item tower's caches are built on), the key is the ratio-0 one.
    assert store_for(tmp_path, data, missing_image_ratio=0.5).modality_source("image") == today.modality_source("image")


def test_ratio_zero_is_today(tmp_path, data):
    today, zero = store_for(tmp_path, data), store_for(tmp_path, data, missing_image_ratio=0.0, missing_image_seed=3)
    mask = zero.image_pixels(16)[1]
    assert torch.equal(mask, today.image_pixels(16)[1]) and torch.equal(zero.withhold_images(mask), mask)
    assert zero.withheld_images is None and zero.modality_source("image") == today.modality_source("image")


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"missing_image_ratio": 1.5}, "missing_image_ratio must be a number in \\[0, 1\\]"),
        ({"missing_image_ratio": "half"}, "missing_image_ratio must be a number"),
        ({"missing_image_ratio": 0.5, "missing_image_seed": "x"}, "missing_image_seed must be an integer"),
        ({"missing_image_ratio": 0.5, "modalities": ["text"]}, "this run uses none"),
    ],
)
def test_bad_settings_are_refused(tmp_path, data, keys, message):
    with pytest.raises(ValueError, match=message):
        store_for(tmp_path, data, **keys)


def test_text_only_dataset_with_a_ratio_is_an_error(tmp_path, data):
    keys = quick_config(tmp_path, **data[1], topk=[5, 10], valid_metric="hit@10")
    build_model("FrozenMM", "textonlyds", keys)  # ratio 0: a text-only run, as before
    with pytest.raises(ValueError, match="no item of textonlyds has an image file.*missing_image_ratio: 0"):
        build_model("FrozenMM", "textonlyds", dict(keys, missing_image_ratio=0.3))


# --- every family: as if the files were absent, and it trains -------------------------------------------------


def without_files(data, tmp_path, tokens) -> dict:
    """A copy of the dataset whose images of ``tokens`` are deleted."""
    source = Path(data[0]["data_path"]) / DATASET
    copy_root = tmp_path / "absent"
    shutil.copytree(source, copy_root / DATASET)
    for token in tokens:
        (copy_root / DATASET / "images" / f"{token}.jpg").unlink()
    return dict(data[0], data_path=str(copy_root), image_dir=str(copy_root / DATASET / "images"))


@pytest.mark.parametrize("model_name, peft_type", [("FrozenMM", "LORA"), ("GlobalPEFT", "LORA"),
                                                   ("GlobalPEFT", "IISAN")])  # fmt: skip
def test_withheld_images_equal_absent_files_in_every_family(tmp_path, data, model_name, peft_type):
    keys = config_keys(tmp_path, data, peft_type=peft_type, missing_image_ratio=0.5)
    _, model, train_data, _, _ = build_model(model_name, DATASET, keys)
    tower = model.item_tower
    tokens = train_data._dataset.field2id_token["item_id"]
    withheld = [tokens[i] for i in range(1, len(tokens)) if tower.has_text[i] and not tower.has_image[i]]
    assert len(withheld) == 12 + 1  # half of the 24 images, and the item that never had one
    absent_keys = dict(keys, **without_files(data, tmp_path, [t for t in withheld if t != NO_IMAGE_ITEM]),
                       missing_image_ratio=0.0)  # fmt: skip
    _, reference, *_ = build_model(model_name, DATASET, absent_keys)
    assert torch.equal(reference.item_tower.has_image, tower.has_image)
    model.eval(), reference.eval()
    # Float noise only: the withheld run's caches encode all 24 images, the reference's the 12 files left, so
    # their encoder batches differ in size and BLAS blocks them differently (seen at 2.4e-5 with one thread).
    torch.testing.assert_close(model.item_table(), reference.item_table(), atol=1e-4, rtol=1e-4)
    # It trains: one step, finite loss, the image placeholder (used by the withheld items) gets a gradient.
    model.train()
    batch = next(iter(train_data))
    loss = model.calculate_loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    if model_name == "FrozenMM" or peft_type == "LORA":
        assert tower.placeholders["image"].grad is not None and tower.placeholders["image"].grad.abs().sum() > 0


@pytest.mark.parametrize("model_name, peft_type", [("FrozenMM", "LORA"), ("GlobalPEFT", "IISAN")])
def test_every_ratio_shares_the_frozen_caches(tmp_path, data, model_name, peft_type):
    keys = config_keys(tmp_path, data, peft_type=peft_type)
    cache_dir = Path(keys["cache_dir"])
    _, full, *_ = build_model(model_name, DATASET, keys)
    built = sorted(p.name for p in cache_dir.rglob("*") if p.is_file())
    assert any(name.startswith(("features-image", "layers-image")) for name in built)  # an image cache exists
    _, half, *_ = build_model(model_name, DATASET, dict(keys, missing_image_ratio=0.5))
    assert sorted(p.name for p in cache_dir.rglob("*") if p.is_file()) == built  # nothing new: the same caches
    assert int(half.item_tower.has_image.sum()) == int(full.item_tower.has_image.sum()) - 12


def test_a_run_with_withheld_images_trains_and_tests(tmp_path, data, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    keys = config_keys(tmp_path, data, peft_type="IISAN", missing_image_ratio=0.5)
    with caplog.at_level(logging.INFO):
        run("GlobalPEFT", DATASET, config_dict=keys, result_file=str(tmp_path / "r.json"))
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["config"]["missing_image_ratio"] == 0.5 and set(result["test_result"]) >= {"hit@5", "ndcg@10"}
    assert "withheld the images of 12 of the 24 items" in caplog.text
