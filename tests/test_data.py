"""The data layer on generated atomic files: dataset, modality store, sampling, filtering, sampler, loader."""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from recbole.data.dataloader import FullSortEvalDataLoader
from recbole.data.dataset import SequentialDataset

from recbole_perpeft.config import Config
from recbole_perpeft.data import ItemModalityStore, MultimodalSequentialDataset, create_dataset, data_preparation
from recbole_perpeft.data import modality_store as modality_store_module
from recbole_perpeft.data.dataloader import NEG_LIST, TARGET_LIST, UserSequenceDataLoader
from recbole_perpeft.data.modality_store import load_image
from recbole_perpeft.data.sampler import SequenceNegativeSampler
from recbole_perpeft.utils import get_model

SHARED_POSTERS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "ml-100k-posters" / "images"
NO_K_CORE = {"user_inter_num_interval": None, "item_inter_num_interval": None}


def item_rows(dataset) -> dict[str, int]:
    """Item token -> internal id."""
    return {token: i for i, token in enumerate(dataset.field2id_token["item_id"])}


def kept_users(dataset) -> set[str]:
    return set(dataset.field2id_token["user_id"][1:])


# --- MultimodalSequentialDataset: raw modalities ---------------------------------------------------


def test_create_dataset_builds_our_sequential_dataset(toy_dataset, toy_config):
    dataset = create_dataset(toy_config("GlobalPEFT", toy_dataset))
    assert isinstance(dataset, MultimodalSequentialDataset)
    assert dataset.user_num - 1 == 30
    assert dataset.item_num - 1 == 25  # every core item survives 5-core filtering


def test_item_texts_by_internal_id(toy_dataset, toy_config):
    config = toy_config("FrozenMM", toy_dataset)
    dataset = create_dataset(config)
    texts = dataset.item_texts()  # before build(): item_feat is still a DataFrame
    tokens = dataset.field2id_token["item_id"]
    assert len(texts) == dataset.item_num
    assert texts[0] == ""
    for item in range(1, dataset.item_num):
        assert texts[item] == toy_dataset.titles[tokens[item]]
    assert texts[item_rows(dataset)[toy_dataset.empty_title_item]] == ""
    assert texts[item_rows(dataset)["1"]] == "movie 1 part 1"

    data_preparation(config, dataset)  # build(): item_feat becomes an Interaction
    assert dataset.item_texts() == texts


def test_item_texts_empty_without_text_field(toy_dataset, toy_config):
    dataset = create_dataset(toy_config("GlobalPEFT", toy_dataset, text_field=None))
    assert dataset.item_texts() == [""] * dataset.item_num


def test_item_texts_from_a_token_field(build_toy_dataset, toy_config):
    data = build_toy_dataset()
    # A single-token column works as text too (here the image path column, "" where empty).
    dataset = create_dataset(toy_config("GlobalPEFT", data, text_field="image"))
    texts = dataset.item_texts()
    rows = item_rows(dataset)
    assert texts[rows["1"]] == "images/1.jpg"
    assert texts[rows[data.no_image_item]] == ""


def test_item_texts_rejects_a_float_field(toy_dataset, toy_config):
    dataset = create_dataset(toy_config("GlobalPEFT", toy_dataset, text_field="price"))
    with pytest.raises(ValueError, match="text_field 'price'"):
        dataset.item_texts()


def test_item_image_paths_from_image_dir(toy_dataset, toy_config):
    dataset = create_dataset(toy_config("GlobalPEFT", toy_dataset))
    paths = dataset.item_image_paths()
    tokens = dataset.field2id_token["item_id"]
    assert paths[0] is None
    for item in range(1, dataset.item_num):  # default image_dir: <data_path>/<dataset>/images
        assert paths[item] == os.path.join(str(toy_dataset.root), toy_dataset.name, "images", f"{tokens[item]}.jpg")


def test_item_image_paths_with_image_name_format(toy_dataset, toy_config, tmp_path):
    posters = tmp_path / "posters"
    config = toy_config("GlobalPEFT", toy_dataset, image_dir=str(posters), image_name_format="poster-{item_id}.png")
    dataset = create_dataset(config)
    paths = dataset.item_image_paths()
    assert paths[item_rows(dataset)["12"]] == os.path.join(str(posters), "poster-12.png")
    assert paths[0] is None


def test_item_image_paths_from_image_field(toy_dataset, toy_config):
    config = toy_config("GlobalPEFT", toy_dataset, image_field="image")
    dataset = create_dataset(config)
    paths = dataset.item_image_paths()
    rows = item_rows(dataset)
    assert paths[0] is None
    assert paths[rows[toy_dataset.no_image_item]] is None  # empty value in the column
    for token, relative in toy_dataset.image_files.items():
        if relative and token in rows:
            assert paths[rows[token]] == os.path.join(str(toy_dataset.folder), relative)
    data_preparation(config, dataset)
    assert dataset.item_image_paths() == paths


def test_image_field_must_be_loaded(toy_dataset, toy_config):
    load_col = {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title"]}
    dataset = create_dataset(toy_config("GlobalPEFT", toy_dataset, image_field="image", load_col=load_col))
    with pytest.raises(ValueError, match="image_field 'image'"):
        dataset.item_image_paths()


# --- ItemModalityStore ------------------------------------------------------------------------------


class FakeTokenizer:
    """Callable like a transformers tokenizer; counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, texts, max_length, truncation, padding, return_tensors):
        assert padding == "max_length" and truncation and return_tensors == "pt"
        self.calls += 1
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, text in enumerate(texts):
            words = text.split()[:max_length]
            ids[row, : len(words)] = torch.tensor([sum(map(ord, w)) for w in words], dtype=torch.long)
            mask[row, : len(words)] = 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def failing(*args, **kwargs):
    raise AssertionError("the cache should have been used")


@pytest.fixture
def store_setup(toy_dataset, toy_config):
    config = toy_config("GlobalPEFT", toy_dataset)
    dataset = create_dataset(config)
    return config, dataset


def test_store_has_text_mask(store_setup, toy_dataset, caplog):
    config, dataset = store_setup
    with caplog.at_level(logging.WARNING):
        store = ItemModalityStore(config, dataset)
    rows = item_rows(dataset)
    expected = torch.ones(dataset.item_num, dtype=torch.bool)
    expected[0] = False
    expected[rows[toy_dataset.empty_title_item]] = False
    assert torch.equal(store.has_text, expected)
    assert store.n_items == dataset.item_num
    assert "1 of 25 items have no text" in caplog.text


def test_store_image_pixels_and_mask(store_setup, toy_dataset, caplog):
    config, dataset = store_setup
    store = ItemModalityStore(config, dataset)
    with caplog.at_level(logging.WARNING):
        pixels, has_image = store.image_pixels(16)
    assert pixels.shape == (dataset.item_num, 3, 16, 16) and pixels.dtype == np.uint8
    assert has_image.dtype == torch.bool and has_image.shape == (dataset.item_num,)

    rows = item_rows(dataset)
    missing = {0, rows[toy_dataset.no_image_item], rows[toy_dataset.corrupt_image_item]}
    for item in range(dataset.item_num):
        assert bool(has_image[item]) is (item not in missing)
    for item in missing:
        assert not pixels[item].any()
    for token, colour in toy_dataset.colours.items():  # solid JPEGs decode to (about) their colour
        if token in rows:
            mean = pixels[rows[token]].reshape(3, -1).mean(axis=1)
            np.testing.assert_allclose(mean, colour, atol=8)

    corrupt_path = os.path.join(str(toy_dataset.image_dir), f"{toy_dataset.corrupt_image_item}.jpg")
    corrupt_warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "Corrupt image" in r.message]
    assert len(corrupt_warnings) == 1
    assert corrupt_path in corrupt_warnings[0].message
    # image_availability only checks existence: the corrupt file exists, the missing one does not.
    available = store.image_availability()
    assert bool(available[rows[toy_dataset.corrupt_image_item]])
    assert not bool(available[rows[toy_dataset.no_image_item]]) and not bool(available[0])


def test_store_image_pixels_are_cached(store_setup, monkeypatch, tmp_path):
    config, dataset = store_setup
    first_pixels, first_mask = ItemModalityStore(config, dataset).image_pixels(12)
    first_pixels = np.array(first_pixels)
    cached = list((tmp_path / "cache" / config["dataset"]).glob("pixels-*"))
    assert len(cached) == 2  # pixels + mask, under cache_dir/<dataset>

    monkeypatch.setattr(modality_store_module, "load_image", failing)
    for store in (ItemModalityStore(config, dataset), ItemModalityStore(config, dataset)):
        pixels, mask = store.image_pixels(12)
        np.testing.assert_array_equal(pixels, first_pixels)
        assert torch.equal(mask, first_mask)
    # Another size is another cache entry, which needs decoding.
    with pytest.raises(AssertionError, match="cache"):
        ItemModalityStore(config, dataset).image_pixels(10)


def test_store_image_pixels_with_image_field(toy_dataset, toy_config):
    config = toy_config("GlobalPEFT", toy_dataset, image_field="image")
    dataset = create_dataset(config)
    _, has_image = ItemModalityStore(config, dataset).image_pixels(8)
    rows = item_rows(dataset)
    assert not has_image[rows[toy_dataset.no_image_item]] and not has_image[rows[toy_dataset.corrupt_image_item]]
    assert int(has_image.sum()) == dataset.item_num - 3


def test_store_text_tokens_are_cached(store_setup, toy_dataset):
    config, dataset = store_setup
    store = ItemModalityStore(config, dataset)
    tokenizer = FakeTokenizer()
    tokens = store.text_tokens(tokenizer, max_length=6, tokenizer_id="fake")
    assert tokenizer.calls == 1
    assert set(tokens) == {"input_ids", "attention_mask"}
    for value in tokens.values():
        assert value.dtype == torch.int32 and value.shape == (dataset.item_num, 6)
    empty = item_rows(dataset)[toy_dataset.empty_title_item]
    assert tokens["attention_mask"][empty].sum() == 0 and tokens["attention_mask"][0].sum() == 0
    assert tokens["attention_mask"][item_rows(dataset)["1"]].sum() == 4  # "movie 1 part 1"

    again = ItemModalityStore(config, dataset).text_tokens(failing, max_length=6, tokenizer_id="fake")
    for key in tokens:
        assert torch.equal(again[key], tokens[key])
    # A different tokenizer or length is a different cache entry.
    store.text_tokens(tokenizer, max_length=6, tokenizer_id="other")
    store.text_tokens(tokenizer, max_length=4, tokenizer_id="fake")
    assert tokenizer.calls == 3


def test_load_image_resizes_shorter_side_and_centre_crops(tmp_path):
    from PIL import Image

    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (30, 0, 40, 20))  # a blue band on the right, cropped away
    path = tmp_path / "wide.png"
    image.save(path)
    pixels = load_image(str(path), 10)
    assert pixels.shape == (3, 10, 10) and pixels.dtype == np.uint8
    assert pixels[0].min() > 200 and pixels[2].max() < 60


@pytest.mark.skipif(not SHARED_POSTERS.is_dir(), reason=f"optional real posters not present at {SHARED_POSTERS}")
def test_load_image_on_a_real_poster():
    poster = next(iter(sorted(SHARED_POSTERS.glob("*.jpg"))))
    pixels = load_image(str(poster), 32)
    assert pixels.shape == (3, 32, 32) and pixels.dtype == np.uint8
    assert pixels.std() > 0


# --- user sampling and filtering -------------------------------------------------------------------


def test_user_sample_ratio_is_seeded(toy_dataset, toy_config):
    def users(seed, ratio=0.5):
        return kept_users(
            create_dataset(toy_config("GlobalPEFT", toy_dataset, seed=seed, user_sample_ratio=ratio, **NO_K_CORE))
        )

    first, again, other = users(2024), users(2024), users(7)
    assert first == again
    assert first != other
    assert len(first) == len(other) == 15  # round(30 * 0.5)
    assert len(users(2024, ratio=0.2)) == 6
    assert users(2024, ratio=1.0) == set(toy_dataset.sequences)


def test_user_sample_ratio_keeps_whole_users(toy_dataset, toy_config):
    dataset = create_dataset(toy_config("GlobalPEFT", toy_dataset, user_sample_ratio=0.5, **NO_K_CORE))
    users = dataset.field2id_token["user_id"]
    counts = Counter(users[u] for u in dataset.inter_feat["user_id"].to_numpy())
    assert counts == {user: len(toy_dataset.sequences[user]) for user in kept_users(dataset)}


def test_user_sample_ratio_before_k_core(toy_dataset, toy_config):
    dataset = create_dataset(toy_config("GlobalPEFT", toy_dataset, user_sample_ratio=0.5))
    assert 12 <= dataset.user_num - 1 <= 15  # sampled 15; 5-core filtering may only remove more
    assert min(Counter(dataset.inter_feat["user_id"].to_numpy()).values()) >= 5
    assert min(Counter(dataset.inter_feat["item_id"].to_numpy()).values()) >= 5


def test_k_core_filter(build_toy_dataset, toy_config):
    data = build_toy_dataset(sparse_users=2, rare_items=2)
    dataset = create_dataset(toy_config("GlobalPEFT", data))  # overall.yaml: "[5,inf)" for users and items
    user_counts = Counter(dataset.inter_feat["user_id"].to_numpy())
    item_counts = Counter(dataset.inter_feat["item_id"].to_numpy())
    assert min(user_counts.values()) >= 5 and min(item_counts.values()) >= 5
    assert kept_users(dataset) == {f"u{u}" for u in range(1, 31)}  # s1, s2 had 3 interactions
    items = set(dataset.field2id_token["item_id"][1:])
    assert items == {str(i) for i in range(1, 26)}  # the rare items (2 users each) and the unused one go
    assert len(user_counts) == dataset.user_num - 1 and len(item_counts) == dataset.item_num - 1
    assert len(dataset.item_feat) == dataset.item_num


def test_items_without_interactions_are_dropped_from_item_feat(toy_dataset, toy_config):
    config = toy_config("GlobalPEFT", toy_dataset, user_sample_ratio=0.3, **NO_K_CORE)
    ours = create_dataset(config)
    interacted = set(ours.inter_feat["item_id"].to_numpy())
    assert set(ours.item_feat["item_id"].to_numpy()) - {0} == interacted
    assert toy_dataset.unused_item not in ours.field2id_token["item_id"]
    assert ours.item_num - 1 == len(interacted)
    # RecBole's own dataset (no k-core) would keep the never-interacted item as a rankable candidate.
    plain = SequentialDataset(toy_config("GlobalPEFT", toy_dataset, **NO_K_CORE))
    assert toy_dataset.unused_item in plain.field2id_token["item_id"]


def test_user_sample_ratio_only_for_sequential_models(toy_dataset, toy_config):
    with pytest.raises(ValueError, match="user_sample_ratio"):
        create_dataset(toy_config("BPR", toy_dataset, user_sample_ratio=0.5))


# --- SequenceNegativeSampler ------------------------------------------------------------------------


@st.composite
def sampler_cases(draw):
    n_items = draw(st.integers(3, 40))
    if draw(st.booleans()):
        candidates = sorted(draw(st.sets(st.integers(1, n_items - 1), min_size=1)))
    else:
        candidates = None
    pool = candidates if candidates is not None else list(range(1, n_items))
    batch, length = draw(st.integers(1, 6)), draw(st.integers(1, 12))
    rows = []
    for _ in range(batch):
        free = draw(st.sampled_from(pool))  # at least one candidate stays out of each history
        items = st.integers(0, n_items - 1).filter(lambda i, f=free: i != f)
        rows.append(draw(st.lists(items, min_size=length, max_size=length)))
    num, seed = draw(st.integers(1, 12)), draw(st.integers(0, 2**31))
    return n_items, candidates, torch.tensor(rows, dtype=torch.long), num, seed


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(sampler_cases())
def test_negatives_avoid_history_and_padding(case):
    n_items, candidates, history, num, seed = case
    negatives = SequenceNegativeSampler(n_items, seed, candidates).sample(history, num)
    assert negatives.shape == (history.shape[0], num) and negatives.dtype == torch.long
    assert (negatives != 0).all()
    allowed = set(candidates) if candidates is not None else set(range(1, n_items))
    for row, negs in zip(history.tolist(), negatives.tolist(), strict=True):
        assert not set(negs) & set(row)
        assert set(negs) <= allowed
    again = SequenceNegativeSampler(n_items, seed, candidates).sample(history, num)
    assert torch.equal(negatives, again)


def test_sampler_seeds_and_successive_draws():
    history = torch.tensor([[1, 2, 0], [3, 4, 5]])
    a, b = SequenceNegativeSampler(50, seed=1), SequenceNegativeSampler(50, seed=1)
    first = a.sample(history, 20)
    assert torch.equal(first, b.sample(history, 20))
    assert not torch.equal(first, a.sample(history, 20))  # the generator advances
    assert not torch.equal(first, SequenceNegativeSampler(50, seed=2).sample(history, 20))


def test_sampler_raises_when_history_covers_all_candidates():
    with pytest.raises(ValueError, match="every candidate"):
        SequenceNegativeSampler(6, seed=0, candidates=np.array([2, 3])).sample(torch.tensor([[2, 3, 0], [1, 0, 0]]), 4)
    with pytest.raises(ValueError, match="every candidate"):
        SequenceNegativeSampler(4, seed=0).sample(torch.tensor([[3, 1, 2]]), 1)


# --- UserSequenceDataLoader and evaluation loaders -------------------------------------------------

MAX_LEN = 7


@pytest.fixture
def loaders(toy_dataset, toy_config):
    config = toy_config("GlobalPEFT", toy_dataset, MAX_ITEM_LIST_LENGTH=MAX_LEN, train_batch_size=8)
    dataset = create_dataset(config)
    return dataset, data_preparation(config, dataset, get_model("GlobalPEFT"))


def test_train_loader_one_row_per_user(loaders, toy_dataset):
    dataset, (train_data, _, _) = loaders
    assert isinstance(train_data, UserSequenceDataLoader)
    batches = list(train_data)
    users = torch.cat([b["user_id"] for b in batches]).tolist()
    assert sorted(users) == list(range(1, dataset.user_num))
    assert max(len(b) for b in batches) == 8


def test_train_loader_reproduces_training_sequences(loaders, toy_dataset):
    dataset, (train_data, _, _) = loaders
    user_tokens, item_tokens = dataset.field2id_token["user_id"], dataset.field2id_token["item_id"]
    seen = 0
    for batch in train_data:
        seq, targets, negs = batch["item_id_list"], batch[TARGET_LIST], batch[NEG_LIST]
        assert seq.shape == targets.shape == negs.shape and seq.shape[1] == MAX_LEN
        for row in range(len(batch)):
            length = int(batch["item_length"][row])
            training = toy_dataset.sequences[user_tokens[batch["user_id"][row]]][:-2]
            inputs = seq[row, :length].tolist()
            target = targets[row, :length].tolist()
            assert [item_tokens[i] for i in inputs + target[-1:]] == training[-(MAX_LEN + 1) :]
            assert target[:-1] == inputs[1:]  # the target at t is the input at t + 1
            assert item_tokens[target[-1]] == training[-1]
            assert not seq[row, length:].any() and not targets[row, length:].any()
            row_items = set(seq[row].tolist()) | set(targets[row].tolist())
            assert not set(negs[row].tolist()) & row_items
            assert (negs[row] > 0).all()
            seen += 1
    assert seen == len(toy_dataset.sequences)


def test_eval_loaders_are_leave_one_out_full_sort(loaders, toy_dataset):
    dataset, (_, valid_data, test_data) = loaders
    assert isinstance(valid_data, FullSortEvalDataLoader) and isinstance(test_data, FullSortEvalDataLoader)
    user_tokens, item_tokens = dataset.field2id_token["user_id"], dataset.field2id_token["item_id"]
    for loader, cut in ((valid_data, 2), (test_data, 1)):
        feat = loader._dataset.inter_feat
        assert len(feat) == len(toy_dataset.sequences)
        for row in range(len(feat)):
            sequence = toy_dataset.sequences[user_tokens[feat["user_id"][row]]]
            assert item_tokens[feat["item_id"][row]] == sequence[-cut]
            length = int(feat["item_length"][row])
            assert [item_tokens[i] for i in feat["item_id_list"][row, :length].tolist()] == sequence[:-cut][-MAX_LEN:]


def test_recbole_models_keep_recbole_training_loader(toy_dataset, toy_config):
    config = toy_config("SASRec", toy_dataset)
    train_data, _, _ = data_preparation(config, create_dataset(config), get_model("SASRec"))
    assert not isinstance(train_data, UserSequenceDataLoader)


# --- configuration errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [2, 0, -0.5, "half"])
def test_bad_user_sample_ratio(toy_dataset, toy_config, ratio):
    with pytest.raises(ValueError, match="user_sample_ratio"):
        toy_config("GlobalPEFT", toy_dataset, user_sample_ratio=ratio)


@pytest.mark.parametrize("modalities", [["audio"], [], ["text", "video"]])
def test_bad_modalities(toy_dataset, toy_config, modalities):
    with pytest.raises(ValueError, match="modalities"):
        toy_config("GlobalPEFT", toy_dataset, modalities=modalities)


def test_modalities_string_becomes_a_list(toy_dataset, toy_config):
    assert toy_config("GlobalPEFT", toy_dataset, modalities="text")["modalities"] == ["text"]


def test_unknown_dataset(base_config, tmp_path):
    # Config does not look for the files (create_dataset prepares known datasets on first use).
    config = Config(model="GlobalPEFT", dataset="no-such-data", config_dict={**base_config, "data_path": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match=r"no-such-data\.inter"):
        create_dataset(config)


def test_unknown_model(toy_dataset, toy_config):
    with pytest.raises(ValueError, match="NoSuchModel") as err:
        toy_config("NoSuchModel", toy_dataset)
    assert "FrozenMM" in str(err.value) and "GlobalPEFT" in str(err.value)
    with pytest.raises(ValueError, match="FrozenMM, GlobalPEFT"):
        get_model("globalpeft")  # case-sensitive
