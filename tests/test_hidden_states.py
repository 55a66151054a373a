"""Per-layer summaries of the frozen encoders (tiny CLIP, MiniLM + EfficientNet-Lite0), layer
selection, and the fp16 memory-mapped layer-state cache read by side networks."""

from __future__ import annotations

import glob
import json
import logging
import os

import numpy as np
import pytest
import torch

from recbole_perpeft.data.modality_store import ItemModalityStore
from recbole_perpeft.encoders.base import select_layers
from recbole_perpeft.encoders.clip import ClipFoundation
from recbole_perpeft.encoders.hidden_states import LayerStates, layer_states_path, load_layer_states
from recbole_perpeft.encoders.text_image import TextImageFoundation
from tests.tiny import make_tiny_clip

TITLES = ["the blue river 1", "night city", "lost star of the dark king 3", "a", "love war road 12"]
LITE0_WIDTHS = [32, 16, 24, 40, 80, 112, 192, 320, 1280]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    tiny = make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))
    return ClipFoundation({"clip_path": tiny.path, "text_max_length": 16})


@pytest.fixture(scope="module")
def text_image():
    config = {"text_encoder_path": None, "text_pooling": None, "text_max_length": 16, "image_size": 64}
    return TextImageFoundation(config)


def tokens(foundation, texts=TITLES):
    enc = foundation.tokenizer(
        texts, max_length=foundation.text_max_length, truncation=True, padding="max_length", return_tensors="pt"
    )
    return {"input_ids": enc["input_ids"].to(torch.int32), "attention_mask": enc["attention_mask"].to(torch.int32)}


def pixels(n, size, seed=0):
    return {"pixels": torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed),
                                    dtype=torch.uint8)}  # fmt: skip


def all_states(foundation, modality, inputs):
    n = foundation.num_layer_states(modality)
    with torch.inference_mode():
        states = foundation.layer_states(modality, inputs, list(range(n)))
    assert len(states) == n == len(foundation.layer_widths(modality))
    for state, width in zip(states, foundation.layer_widths(modality), strict=True):
        assert state.shape == (len(next(iter(inputs.values()))), width)
    return states


# --- the last summary is the encoder's own pooled output ----------------------------------------------


def test_clip_text_last_summary_is_the_eos_pooler_input(clip):
    inputs = tokens(clip)
    states = all_states(clip, "text", inputs)
    assert clip.num_layer_states("text") == clip.clip.config.text_config.num_hidden_layers + 1
    with torch.inference_mode():
        out = clip.clip.text_model(input_ids=inputs["input_ids"].long(), attention_mask=inputs["attention_mask"].long())
        torch.testing.assert_close(clip.clip.text_model.final_layer_norm(states[-1]), out.pooler_output)
        torch.testing.assert_close(clip.clip.text_projection(clip.clip.text_model.final_layer_norm(states[-1])),
                                   clip.encode("text", inputs))  # fmt: skip
    # The pooled token is the first EOS (the tiny config's eos_token_id is not the legacy 2).
    eos = clip.tokenizer.eos_token_id
    assert clip.clip.text_model.eos_token_id == eos != 2
    first_eos = (inputs["input_ids"] == eos).int().argmax(-1)
    assert torch.equal(clip.eos_positions(inputs["input_ids"]), first_eos)


def test_clip_text_legacy_eos_rule(clip, monkeypatch):
    # eos_token_id == 2 (checkpoints from before transformers PR #24773): the argmax of the ids.
    monkeypatch.setattr(clip.clip.text_model, "eos_token_id", 2)
    ids = torch.tensor([[5, 9, 2, 2, 1], [7, 3, 4, 8, 0]])
    assert clip.eos_positions(ids).tolist() == [1, 3]


def test_clip_vision_last_summary_is_the_cls_pooler_input(clip):
    inputs = pixels(3, clip.image_size)
    states = all_states(clip, "image", inputs)
    assert clip.num_layer_states("image") == clip.clip.config.vision_config.num_hidden_layers + 1
    with torch.inference_mode():
        out = clip.clip.vision_model(pixel_values=clip.normalize(inputs["pixels"]))
        torch.testing.assert_close(clip.clip.vision_model.post_layernorm(states[-1]), out.pooler_output)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_bert_text_last_summary_is_encode_text(text_image, pooling, monkeypatch):
    monkeypatch.setattr(text_image, "pooling", pooling)
    inputs = tokens(text_image)
    states = all_states(text_image, "text", inputs)
    assert len(states) == text_image.text_model.config.num_hidden_layers + 1 == 7
    with torch.inference_mode():
        torch.testing.assert_close(states[-1], text_image.encode("text", inputs))
    # A subset, in the order asked for, equals the full run's states.
    with torch.inference_mode():
        subset = text_image.layer_states("text", inputs, [4, 0])
    torch.testing.assert_close(subset[0], states[4])
    torch.testing.assert_close(subset[1], states[0])


def test_efficientnet_summaries_stem_stages_head(text_image):
    assert text_image.layer_widths("image") == LITE0_WIDTHS
    assert text_image.num_layer_states("image") == 9
    # Stage ends follow the blocks args (lite0: repeats 1, 2, 2, 3, 3, 4, 1 over 16 blocks).
    assert text_image.image_stage_ends() == [0, 2, 4, 7, 10, 14, 15]
    blocks = text_image.image_model._blocks
    for end in text_image.image_stage_ends()[:-1]:
        following = blocks[end + 1]._block_args
        assert following.input_filters != following.output_filters or following.stride != 1
    inputs = pixels(2, text_image.image_size)
    states = all_states(text_image, "image", inputs)
    with torch.inference_mode():
        torch.testing.assert_close(states[-1], text_image.encode("image", inputs))
        # Early points stop early and agree with the full run.
        early = text_image.layer_states("image", inputs, [0, 3])
    torch.testing.assert_close(early[0], states[0])
    torch.testing.assert_close(early[1], states[3])


def test_layer_indices_are_checked(clip):
    n = clip.num_layer_states("text")
    for bad in ([n], [-1], [], [1.0]):
        with pytest.raises(ValueError, match="Layer-state indices"):
            clip.layer_states("text", tokens(clip), bad)


# --- select_layers ------------------------------------------------------------------------------------


def test_select_layers_default_counts_back_from_the_last():
    assert select_layers(7) == [0, 2, 4, 6]
    assert select_layers(13) == [0, 2, 4, 6, 8, 10, 12]
    assert select_layers(9) == [0, 2, 4, 6, 8]
    assert select_layers(10) == [1, 3, 5, 7, 9]
    assert select_layers(9, stride=3) == [2, 5, 8]
    assert select_layers(1) == [0]
    assert select_layers(5, stride=1) == [0, 1, 2, 3, 4]


def test_select_layers_explicit_list():
    assert select_layers(7, [6, 0, -1, 3]) == [0, 3, 6]
    assert select_layers(7, (-7,)) == [0]


@pytest.mark.parametrize("spec", [[7], [-8], [], [1.5], ["2"], [True], "0,2", 3])
def test_select_layers_rejects_bad_specs(spec):
    with pytest.raises(ValueError, match="side_layers"):
        select_layers(7, spec)


def test_select_layers_rejects_bad_stride():
    with pytest.raises(ValueError, match="side_layers"):
        select_layers(7, stride=0)


# --- the cache ----------------------------------------------------------------------------------------


def make_store(cache_dir, texts=("",) + tuple(TITLES)) -> ItemModalityStore:
    """An ItemModalityStore with just what the caches read (no RecBole dataset needed)."""
    store = ItemModalityStore.__new__(ItemModalityStore)
    store.cache_dir = str(cache_dir)
    store.item_tokens = ["[PAD]"] + [str(101 + i) for i in range(len(texts) - 1)]
    store.texts = list(texts)
    store.image_paths = [None] + [f"/nowhere/{t}.jpg" for t in store.item_tokens[1:]]
    store.n_items = len(texts)
    return store


class Counting:
    """Wraps foundation.layer_states, counting the calls."""

    def __init__(self, foundation):
        self.calls, self.inner = 0, foundation.layer_states

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


def text_inputs(foundation, store):
    table = tokens(foundation, store.texts)
    return lambda items: {k: v[items] for k, v in table.items()}


def test_layer_state_cache_built_once_then_memory_mapped(clip, tmp_path, monkeypatch, caplog):
    store = make_store(tmp_path / "cache")
    present = torch.tensor([False, True, True, False, True, True])  # item 3 has no text
    encode_inputs = text_inputs(clip, store)
    layers = [0, 2]
    counting = Counting(clip)
    monkeypatch.setattr(clip, "layer_states", counting)
    with caplog.at_level(logging.INFO):
        built = load_layer_states(store, clip, "text", layers, encode_inputs, present, batch_size=2)
    assert counting.calls == 2  # 4 present items in batches of 2
    assert "built in" in caplog.text and built.path in caplog.text
    assert built.layers == layers and built.widths == [32, 32] and built.n_items == store.n_items

    on_disk = np.load(built.path, mmap_mode="r")
    assert on_disk.dtype == np.float16 and on_disk.shape == (6, 64)
    assert isinstance(built.array, np.memmap) and built.array.dtype == np.float16
    assert not glob.glob(os.path.join(store.cache_dir, "*tmp*"))  # no leftovers of the atomic write
    meta = json.loads(open(built.path[: -len(".npy")] + ".json").read())
    assert meta["layers"] == layers and meta["widths"] == [32, 32]
    assert os.path.basename(built.path).startswith("layers-text-")
    assert built.path == layer_states_path(store, clip, "text", layers) + ".npy"

    # Values: the encoder's summaries rounded to fp16; absent items and padding are zero rows.
    items = torch.tensor([4, 0, 3, 1, 4, 2])
    got = built.gather(items)
    assert [g.shape for g in got] == [(6, 32), (6, 32)] and all(g.dtype == torch.float32 for g in got)
    with torch.inference_mode():
        expected = counting.inner("text", encode_inputs(items), layers)
    rows = [0, 3, 4, 5]  # the present items (4, 1, 4, 2)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g[rows], e[rows].half().float())
        assert torch.all(g[1] == 0) and torch.all(g[2] == 0)
        assert g[0].abs().sum() > 0 and torch.equal(g[0], g[4])

    # A second load: memory-mapped, no encoder call, the same values.
    def boom(*args, **kwargs):
        raise AssertionError("the encoder ran although the layer states are cached")

    monkeypatch.setattr(clip, "layer_states", boom)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        loaded = load_layer_states(store, clip, "text", layers, encode_inputs, present, batch_size=2)
    assert "loaded from cache" in caplog.text and loaded.path == built.path
    assert isinstance(loaded.array, np.memmap)
    for a, b in zip(loaded.gather(items), got, strict=True):
        assert torch.equal(a, b)
    # Any shape of item ids, and the ids' device.
    grid = loaded.gather(items.view(2, 3))
    assert grid[1].shape == (2, 3, 32) and torch.equal(grid[1].view(6, 32), got[1])


def test_interrupted_cache_build_resumes_where_it_stopped(clip, tmp_path, monkeypatch, caplog):
    store = make_store(tmp_path / "cache")
    present = torch.ones(store.n_items, dtype=torch.bool)  # items 1..5 (0 is padding)
    encode_inputs = text_inputs(clip, store)
    inner = clip.layer_states

    def interrupted(modality, inputs, layers, calls=[]):  # noqa: B006 - counts across calls
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return inner(modality, inputs, layers)

    monkeypatch.setattr(clip, "layer_states", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_layer_states(store, clip, "text", [0, 2], encode_inputs, present, batch_size=2)
    assert not glob.glob(os.path.join(store.cache_dir, "layers-text-*[0-9a-f].npy"))  # nothing final yet
    counting = Counting(clip)
    counting.inner = inner
    monkeypatch.setattr(clip, "layer_states", counting)
    with caplog.at_level(logging.INFO):
        resumed = load_layer_states(store, clip, "text", [0, 2], encode_inputs, present, batch_size=2)
    assert "4 of 5 items already encoded" in caplog.text
    assert counting.calls == 1  # only the last item was left
    assert not glob.glob(os.path.join(store.cache_dir, "*partial*"))
    fresh = load_layer_states(make_store(tmp_path / "fresh"), clip, "text", [0, 2], encode_inputs, present)
    for a, b in zip(resumed.gather(torch.arange(6)), fresh.gather(torch.arange(6)), strict=True):
        assert torch.equal(a, b)


def test_layer_state_cache_key_covers_layers_and_encoder(clip, tmp_path, monkeypatch):
    store = make_store(tmp_path / "cache")
    present = torch.ones(store.n_items, dtype=torch.bool)
    encode_inputs = text_inputs(clip, store)
    counting = Counting(clip)
    monkeypatch.setattr(clip, "layer_states", counting)
    first = load_layer_states(store, clip, "text", [0, 2], encode_inputs, present, batch_size=8)
    assert counting.calls == 1
    other_layers = load_layer_states(store, clip, "text", [1, 2], encode_inputs, present, batch_size=8)
    assert counting.calls == 2 and other_layers.path != first.path
    monkeypatch.setitem(clip.cache_ids, "text", clip.cache_ids["text"] + ":other-preprocessing")
    other_encoder = load_layer_states(store, clip, "text", [0, 2], encode_inputs, present, batch_size=8)
    assert counting.calls == 3 and other_encoder.path not in (first.path, other_layers.path)
    # Different dataset items: another key too.
    other_store = make_store(tmp_path / "cache", texts=("",) + tuple(TITLES[::-1]))
    monkeypatch.setitem(clip.cache_ids, "text", clip.cache_ids["text"].replace(":other-preprocessing", ""))
    assert layer_states_path(other_store, clip, "text", [0, 2]) + ".npy" != first.path
    assert len(glob.glob(os.path.join(store.cache_dir, "layers-text-*.npy"))) == 3
    # Row 0 (padding) stays zero even when marked present.
    assert not np.any(np.asarray(first.array[0]))


def test_layer_state_cache_for_images(text_image, tmp_path):
    store = make_store(tmp_path / "cache")
    table = pixels(store.n_items, text_image.image_size, seed=1)["pixels"]
    present = torch.tensor([False, True, False, True, True, False])
    layers = [0, 4, 8]
    states = load_layer_states(store, text_image, "image", layers, lambda items: {"pixels": table[items]},
                               present, batch_size=2)  # fmt: skip
    assert states.widths == [32, 80, 1280] and states.array.shape == (6, 1392)
    assert os.path.basename(states.path).startswith("layers-image-")
    got = states.gather(torch.tensor([3, 2, 1]))
    with torch.inference_mode():
        head = text_image.encode("image", {"pixels": table[torch.tensor([3, 1])]})
    torch.testing.assert_close(got[2][[0, 2]], head.half().float())
    assert all(torch.all(g[1] == 0) for g in got)


def test_layer_states_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        LayerStates(np.zeros((3, 10), dtype=np.float16), [0, 1], [4, 4])
