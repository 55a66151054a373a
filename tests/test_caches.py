"""The on-disk caches (decoded pixels, title tokens, layer states) under change and concurrency: keys
that follow the image files, two processes building one entry, a builder killed mid-way, images too
large for PIL.

The concurrent tests fork their worker processes: a spawned child would re-import torch, RecBole and
peft (many seconds each on a shared CPU) before doing a second of work."""

from __future__ import annotations

import fcntl
import logging
import multiprocessing
import os
import signal
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from recbole_perpeft.data import modality_store
from recbole_perpeft.data.cache_files import atomic_output, build_lock, lock_path, temp_path
from recbole_perpeft.data.modality_store import IMAGE_DECODING, gather_rows, load_image, resize_and_crop
from recbole_perpeft.encoders.hidden_states import layer_states_path, load_layer_states
from tests.test_hidden_states import make_store
from tests.tiny import POSTERS_DIR

SIZE = 8
COLOURS = [(200, 10, 10), (10, 200, 10), (10, 10, 200), (120, 120, 0), (0, 90, 160), (250, 250, 250), (5, 5, 5)]

needs_fork = pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="the concurrency tests fork their workers"
)


def write_png(path: Path, colour, size=(12, 10)) -> None:
    Image.new("RGB", size, colour).save(path, format="PNG")


def image_store(cache_dir, paths):
    """An ItemModalityStore over ``paths`` (items 1..n; None: no image), without a RecBole dataset."""
    store = make_store(cache_dir, texts=("",) + tuple(f"movie {i}" for i in range(len(paths))))
    store.image_paths = [None] + [None if p is None else str(p) for p in paths]
    store.logger = logging.getLogger()
    store.show_progress = False
    return store


@pytest.fixture
def images(tmp_path):
    """Seven item images (PNG, exact colours); item 4's file is missing."""
    folder = tmp_path / "images"
    folder.mkdir()
    paths = [folder / f"{i}.png" for i in range(1, len(COLOURS) + 1)]
    for path, colour in zip(paths, COLOURS, strict=True):
        if path.name != "4.png":
            write_png(path, colour)
    return paths


def solid(pixels, colour) -> bool:
    return bool(np.all(pixels == np.asarray(colour, dtype=np.uint8)[:, None, None]))


class FakeImageEncoder:
    """What load_layer_states needs of a foundation model, on pixels; counts its calls."""

    cache_ids = {"image": "fake-image-encoder"}

    def __init__(self):
        self.calls = 0

    def _check_layers(self, modality, layers):
        return list(layers)

    def layer_widths(self, modality):
        return [3, 2]

    def layer_states(self, modality, inputs, layers):
        self.calls += 1
        x = inputs["pixels"].float()
        table = [x.mean(dim=(2, 3)), torch.stack([x.amin(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3))], dim=1)]
        return [table[i] for i in layers]


def build_layer_states(store, pixels, has_image, encoder, encode_inputs=None):
    encode_inputs = encode_inputs or (lambda items: {"pixels": gather_rows(pixels, items)})
    return load_layer_states(store, encoder, "image", [0, 1], encode_inputs, has_image, batch_size=2)


class CountingTokenizer:
    def __init__(self):
        self.calls = 0

    def __call__(self, texts, max_length, truncation, padding, return_tensors):
        self.calls += 1
        ids = torch.tensor([[len(t), *[0] * (max_length - 1)] for t in texts])
        return {"input_ids": ids, "attention_mask": (ids > 0).long()}


def leftovers(cache_dir) -> list[str]:
    """Temporary or partial files left in a cache folder."""
    return [name for name in os.listdir(cache_dir) if ".tmp" in name or ".partial" in name]


# --- keys follow the image files ------------------------------------------------------------------------


def test_replaced_image_gives_new_pixels(images, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    pixels, has_image = image_store(cache, images).image_pixels(SIZE)
    assert solid(pixels[1], COLOURS[0]) and solid(pixels[2], COLOURS[1])
    encoder = FakeImageEncoder()
    states = build_layer_states(image_store(cache, images), pixels, has_image, encoder)
    np.testing.assert_allclose(states.gather(torch.tensor([2]))[0][0], COLOURS[1])

    # Unchanged files: the same entries, nothing decoded or encoded again.
    def failing(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    with monkeypatch.context() as patch:
        patch.setattr(modality_store, "load_image", failing)
        again, _ = image_store(cache, images).image_pixels(SIZE)
        assert np.array_equal(again, pixels)
        assert build_layer_states(image_store(cache, images), again, has_image, encoder).path == states.path
        assert encoder.calls == 3  # 6 images in batches of 2, built once

    # Item 2's file repaired: same size (a solid PNG of the same shape), new content, new mtime.
    before = os.stat(images[1])
    write_png(images[1], (7, 77, 177))
    os.utime(images[1], ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    assert os.path.getsize(images[1]) == before.st_size
    store = image_store(cache, images)
    fresh, fresh_mask = store.image_pixels(SIZE)
    assert solid(fresh[2], (7, 77, 177)) and solid(fresh[1], COLOURS[0])
    assert torch.equal(fresh_mask, has_image)
    # The caches computed from the images follow: layer states (and frozen features, same key part).
    assert layer_states_path(store, encoder, "image", [0, 1]) + ".npy" != states.path
    rebuilt = build_layer_states(store, fresh, fresh_mask, encoder)
    np.testing.assert_allclose(rebuilt.gather(torch.tensor([2]))[0][0], (7, 77, 177))
    assert store.modality_source("image") != image_store(cache, images[:1] + images[2:] + [None]).modality_source(
        "image"
    )
    assert store.modality_source("image")["decoding"] == IMAGE_DECODING
    assert not leftovers(cache)


def test_image_added_later_is_decoded(images, tmp_path):
    cache = tmp_path / "cache"
    store = image_store(cache, images)
    assert not store.image_availability()[4]
    _, has_image = store.image_pixels(SIZE)
    assert not has_image[4] and int(has_image.sum()) == 6

    write_png(images[3], (90, 45, 30))
    store = image_store(cache, images)
    assert store.image_availability()[4]
    pixels, has_image = store.image_pixels(SIZE)
    assert has_image[4] and int(has_image.sum()) == 7
    assert solid(pixels[4], (90, 45, 30))


def test_stat_once_per_store(images, tmp_path, monkeypatch):
    store = image_store(tmp_path / "cache", images)
    calls = []
    real_stat = os.stat
    monkeypatch.setattr(modality_store.os, "stat", lambda path, *a, **k: calls.append(path) or real_stat(path, *a, **k))
    store.image_availability()
    store.image_pixels(SIZE)
    store.modality_source("image")
    images = {str(p) for p in images}
    assert sorted(c for c in calls if c in images) == sorted(images)  # one os.stat per image file


# --- concurrency ---------------------------------------------------------------------------------------------


def _build_all(cache_dir, paths, barrier, results):
    """A worker process: decode the pixels, build the layer states and the tokens, report what it did."""
    try:
        torch.set_num_threads(1)
        decoded = []
        real_load = modality_store.load_image

        def slow_load(path, size):  # a build long enough for the other process to arrive meanwhile
            decoded.append(path)
            time.sleep(0.05)
            return real_load(path, size)

        modality_store.load_image = slow_load  # this (forked) process only
        store = image_store(cache_dir, paths)
        barrier.wait(timeout=120)
        pixels, has_image = store.image_pixels(SIZE)
        encoder = FakeImageEncoder()
        states = build_layer_states(store, pixels, has_image, encoder)
        tokenizer = CountingTokenizer()
        tokens = store.text_tokens(tokenizer, max_length=4, tokenizer_id="counting")
        results.put(
            {
                "decoded": len(decoded),
                "encoder_calls": encoder.calls,
                "tokenizer_calls": tokenizer.calls,
                "pixels": np.array(pixels),
                "has_image": has_image.numpy(),
                "states": np.array(states.array),
                "input_ids": tokens["input_ids"].numpy(),
            }
        )
    except BaseException:
        results.put({"error": traceback.format_exc()})


@needs_fork
def test_two_processes_build_each_cache_once(images, tmp_path):
    cache = tmp_path / "cache"
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    workers = [ctx.Process(target=_build_all, args=(cache, images, barrier, results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    got = [results.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    assert all("error" not in r for r in got), [r.get("error") for r in got]
    assert all(worker.exitcode == 0 for worker in workers)

    # Each cache was built by one process; the other waited and read it.
    assert sum(r["decoded"] for r in got) == 6
    assert sum(r["encoder_calls"] for r in got) == 3
    assert sum(r["tokenizer_calls"] for r in got) == 1
    first, second = got
    for key in ("pixels", "has_image", "states", "input_ids"):
        assert np.array_equal(first[key], second[key]), key
    # Complete and right: every present image's pixels, as a single process decodes them.
    assert first["has_image"].tolist() == [False, True, True, True, False, True, True, True]
    for item, path in enumerate(images, start=1):
        if item != 4:
            assert np.array_equal(first["pixels"][item], load_image(str(path), SIZE))
    assert not first["states"][4].any() and first["states"][1].any()
    assert not leftovers(cache)
    visible = sorted(name for name in os.listdir(cache) if not name.startswith("."))
    assert [name.split("-")[0] for name in visible] == ["layers", "layers", "pixels", "pixels", "tokens"]


def _build_layers_then_hang(cache_dir, paths, started):
    """A worker that encodes two batches of layer states, then hangs in the third (to be killed)."""
    torch.set_num_threads(1)
    store = image_store(cache_dir, paths)
    pixels, has_image = store.image_pixels(SIZE)
    batches = []

    def encode_inputs(items):
        batches.append(items)
        if len(batches) == 3:
            started.set()
            time.sleep(600)
        return {"pixels": gather_rows(pixels, items)}

    build_layer_states(store, pixels, has_image, FakeImageEncoder(), encode_inputs)


@needs_fork
def test_a_killed_builder_releases_the_lock_and_the_next_run_resumes(images, tmp_path, caplog):
    cache = tmp_path / "cache"
    store = image_store(cache, images)
    pixels, has_image = store.image_pixels(SIZE)
    ctx = multiprocessing.get_context("fork")
    started = ctx.Event()
    worker = ctx.Process(target=_build_layers_then_hang, args=(cache, images, started))
    worker.start()
    try:
        assert started.wait(timeout=120), "the worker never reached its third batch"
        base = layer_states_path(store, FakeImageEncoder(), "image", [0, 1])
        fd = os.open(lock_path(base), os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):  # the worker holds the entry's lock while it builds
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(timeout=60)
    assert worker.exitcode == -signal.SIGKILL

    encoder = FakeImageEncoder()
    with caplog.at_level(logging.INFO):
        resumed = build_layer_states(image_store(cache, images), pixels, has_image, encoder)
    assert "4 of 6 items already encoded" in caplog.text
    assert encoder.calls == 1
    fresh = build_layer_states(image_store(tmp_path / "fresh", images), pixels, has_image, FakeImageEncoder())
    assert np.array_equal(np.asarray(resumed.array), np.asarray(fresh.array))
    assert not leftovers(cache)


def test_temporary_files_of_a_dead_build_are_removed_under_the_lock(tmp_path):
    target = str(tmp_path / "entry.pt")
    stale = temp_path(target)
    Path(stale).write_bytes(b"half of a file")
    other = str(tmp_path / "other.pt.123-abcd.tmp")  # another entry's: not touched
    Path(other).write_bytes(b"x")
    with build_lock(target, [target]) as locked:
        assert locked
        assert not os.path.exists(stale) and os.path.exists(other)
        with atomic_output(target) as tmp:
            Path(tmp).write_bytes(b"whole")
    assert Path(target).read_bytes() == b"whole"
    # A failed write leaves the old file and no temporary one.
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        Path(tmp).write_bytes(b"half")
        raise RuntimeError
    assert Path(target).read_bytes() == b"whole"
    assert sorted(os.listdir(tmp_path)) == ["entry.pt", "other.pt.123-abcd.tmp"]  # the lock file removed on release


def test_without_flock_builds_are_still_atomic(images, tmp_path, monkeypatch):
    from recbole_perpeft.data import cache_files

    monkeypatch.setattr(cache_files, "fcntl", None)
    cache = tmp_path / "cache"
    store = image_store(cache, images)
    pixels, has_image = store.image_pixels(SIZE)
    states = build_layer_states(store, pixels, has_image, FakeImageEncoder())
    fresh = build_layer_states(image_store(tmp_path / "fresh", images), pixels, has_image, FakeImageEncoder())
    assert np.array_equal(np.asarray(states.array), np.asarray(fresh.array))
    assert not leftovers(cache) and not [name for name in os.listdir(cache) if name.endswith(".lock")]


def test_an_interrupted_decode_leaves_nothing_half_written(images, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    real_load = modality_store.load_image

    def interrupted(path, size, calls=[]):  # noqa: B006 - counts across calls
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_load(path, size)

    monkeypatch.setattr(modality_store, "load_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        image_store(cache, images).image_pixels(SIZE)
    assert [name for name in os.listdir(cache) if not name.startswith(".")] == []
    monkeypatch.setattr(modality_store, "load_image", real_load)
    pixels, has_image = image_store(cache, images).image_pixels(SIZE)
    assert int(has_image.sum()) == 6 and solid(pixels[7], COLOURS[6])


# --- images too large for PIL ----------------------------------------------------------------------------------


def test_a_huge_jpeg_is_decoded_at_reduced_scale(tmp_path, caplog):
    huge = tmp_path / "huge.jpg"
    Image.new("L", (14000, 14000), 140).save(huge, format="JPEG", quality=50)  # ~2 MB, 196 Mpixels
    with pytest.raises(Image.DecompressionBombError):  # what PIL alone does with it
        Image.open(huge)
    with caplog.at_level(logging.WARNING), warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        store = image_store(tmp_path / "cache", [huge])
        pixels, has_image = store.image_pixels(SIZE)
    assert has_image[1] and np.abs(pixels[1].astype(int) - 140).max() <= 2
    assert not caplog.records


def test_images_over_pils_limit_are_missing_with_a_warning(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses over 2000 pixels, warns over 1000
    paths = [tmp_path / name for name in ("ok.jpg", "big.jpg", "big.png", "large.png", "after.png")]
    Image.new("RGB", (30, 30), (10, 20, 30)).save(paths[0])  # 900 pixels
    Image.new("RGB", (400, 400), (40, 50, 60)).save(paths[1])  # 2500 pixels even at 1/8 scale
    Image.new("RGB", (400, 400), (70, 80, 90)).save(paths[2])  # no reduced-scale decoding for PNG
    Image.new("RGB", (40, 40), (100, 110, 120)).save(paths[3])  # 1600: over the warning limit only
    Image.new("RGB", (30, 30), (130, 140, 150)).save(paths[4])
    store = image_store(tmp_path / "cache", paths)
    with caplog.at_level(logging.WARNING), warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        pixels, has_image = store.image_pixels(SIZE)
    assert has_image.tolist() == [False, True, False, False, True, True]
    assert solid(pixels[5], (130, 140, 150))  # the run went on past them
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for path in paths[1:3]:
        (message,) = [m for m in messages if str(path) in m]
        assert "too large to decode" in message and "MAX_IMAGE_PIXELS" in message and "Shrink" in message
    (message,) = [m for m in messages if str(paths[3]) in m]
    assert message.startswith("Large image") and "40x40" in message

    # With a higher limit the big JPEG fits at 1/8 scale (50x50): decoded, no warning.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20000)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        big = load_image(str(paths[1]), SIZE)
    assert np.abs(big.astype(int) - np.array([40, 50, 60])[:, None, None]).max() <= 3
    assert not caplog.records


def full_decode(path, size) -> np.ndarray:
    """load_image before reduced-scale decoding: the whole file, resized."""
    with Image.open(path) as img:
        return resize_and_crop(img, size)


@pytest.mark.skipif(not POSTERS_DIR.is_dir(), reason=f"optional real posters not present at {POSTERS_DIR}")
def test_real_posters_decode_as_before():
    posters = sorted(POSTERS_DIR.glob("*.jpg"))[::200]
    assert posters
    for poster in posters:
        for size in (224, 64):  # posters are ~185 px on the shorter side: no reduced-scale decoding
            assert np.array_equal(load_image(str(poster), size), full_decode(poster, size)), (poster, size)
