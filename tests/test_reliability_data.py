"""Issue 44, data side: no silent change of the data (time field type and precision, image modes), bounded
image decoding, and cache builds that survive a full disk and a stuck lock holder."""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from recbole_perpeft.config import Config
from recbole_perpeft.data import ItemModalityStore, cache_files, create_dataset, data_preparation
from recbole_perpeft.data.cache_files import build_lock, lock_path
from recbole_perpeft.data.modality_store import load_image
from tests.test_caches import image_store
from tests.tiny import REPO_ROOT, make_atomic_dataset, quick_config

NAME = "rel"
SMALL_TOPK = {"topk": [5], "valid_metric": "hit@5"}


def config_of(tmp_path: Path, keys: dict, **overrides) -> Config:
    merged = {**keys, **SMALL_TOPK, "state": "WARNING", **overrides}
    return Config(model="GlobalPEFT", dataset=NAME, config_dict=quick_config(tmp_path, **merged))


# --- the time field --------------------------------------------------------------------------------------


@pytest.mark.parametrize("declared", ["token", "token_seq", "float_seq"])
def test_a_time_field_not_declared_float_is_refused_with_file_and_header(tmp_path, declared):
    keys = make_atomic_dataset(tmp_path / "data", NAME, with_images=False)
    inter = tmp_path / "data" / NAME / f"{NAME}.inter"
    lines = inter.read_text().splitlines()
    inter.write_text("\n".join([lines[0].replace("timestamp:float", f"timestamp:{declared}"), *lines[1:]]) + "\n")
    with pytest.raises(ValueError) as err:
        create_dataset(config_of(tmp_path, keys))
    message = str(err.value)
    assert f"{NAME}.inter header declares the time field as timestamp:{declared}" in message
    assert str(inter) in message and "timestamp:float" in message


def test_a_time_field_left_out_of_load_col_is_not_checked(tmp_path):
    keys = make_atomic_dataset(tmp_path / "data", NAME, with_images=False)
    inter = tmp_path / "data" / NAME / f"{NAME}.inter"
    lines = inter.read_text().splitlines()
    inter.write_text("\n".join([lines[0].replace("timestamp:float", "timestamp:token"), *lines[1:]]) + "\n")
    keys["load_col"] = {"inter": ["user_id", "item_id"], "item": ["item_id", "title"]}
    dataset = create_dataset(config_of(tmp_path, keys))
    assert dataset.inter_num == len(lines) - 1


@pytest.mark.parametrize("base", [886324800, 1_700_000_000_000])  # Unix seconds, and milliseconds
def test_timestamps_closer_than_float32_steps_keep_their_order(tmp_path, base):
    """float32 holds Unix seconds in 64-second steps (and milliseconds in far coarser ones): a file not
    sorted by time must still give each user the last item by time as its test item."""
    keys = make_atomic_dataset(tmp_path / "data", NAME, with_images=False)
    inter = tmp_path / "data" / NAME / f"{NAME}.inter"
    header, *rows = inter.read_text().splitlines()
    by_user: dict[str, list[str]] = {}
    for row in rows:
        by_user.setdefault(row.split("\t")[0], []).append(row.split("\t")[1])
    out = [header]
    for user, items in by_user.items():
        # Times one apart, written newest first: only an exact time type can put them back in order.
        out += [f"{user}\t{item}\t{base + k}" for k, item in reversed(list(enumerate(items)))]
    inter.write_text("\n".join(out) + "\n")
    config = config_of(tmp_path, keys)
    dataset = create_dataset(config)
    _, _, test = data_preparation(config, dataset)
    tokens = dataset.field2id_token
    seen = 0
    for batch in test:
        interaction = batch[0]
        for user, target in zip(interaction["user_id"].tolist(), interaction["item_id"].tolist(), strict=True):
            assert tokens["item_id"][target] == by_user[tokens["user_id"][user]][-1]
            seen += 1
    assert seen == len(by_user)


# --- image modes, orientation and shape ------------------------------------------------------------------

SIZE = 16


def grey_of(pixels: np.ndarray) -> float:
    assert pixels.shape == (3, SIZE, SIZE) and pixels.dtype == np.uint8
    assert np.ptp(pixels.astype(int), axis=0).max() <= 1  # grey: the three channels agree
    return float(pixels.mean())


@pytest.mark.parametrize(
    ("mode", "array", "expected"),
    [
        ("I;16", np.full((24, 20), 32896, dtype=np.uint16), 128),  # 16-bit PNG: half of 65535, not white
        ("I;16", np.full((24, 20), 200, dtype=np.uint16), 1),  # a dark 16-bit image stays dark
        ("I", np.full((24, 20), 50000, dtype=np.int32), 194),  # 32-bit holding 16-bit values
        ("I", np.full((24, 20), 100, dtype=np.int32), 100),  # 32-bit holding 8-bit values
        ("F", np.full((24, 20), 0.5, dtype=np.float32), 128),  # float in [0, 1]
        ("F", np.full((24, 20), 77.0, dtype=np.float32), 77),  # float in [0, 255]
    ],
)
def test_deep_greyscale_is_scaled_by_its_range(tmp_path, mode, array, expected):
    image = Image.fromarray(array, mode=mode) if mode != "I;16" else Image.fromarray(array)
    path = tmp_path / ("grey.png" if mode == "I;16" else "grey.tif")
    image.save(path)
    with Image.open(path) as reopened:
        assert reopened.mode.startswith("I") or reopened.mode == "F"  # the mode under test, as read back
    assert abs(grey_of(load_image(str(path), SIZE)) - expected) <= 1


def transparent_square(mode: str) -> Image.Image:
    """Red opaque on the left half, fully transparent (over black) on the right half."""
    rgba = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 10, 20))
    if mode == "LA":
        return rgba.convert("LA")
    if mode == "P":
        return rgba.convert("P")  # a palette with a transparent index
    return rgba


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_over_white(tmp_path, mode):
    path = tmp_path / f"alpha-{mode}.png"
    transparent_square(mode).save(path)
    pixels = load_image(str(path), SIZE)
    right = pixels[:, :, -3:].astype(int)
    assert right.min() >= 250  # transparent: white, not the black stored under it
    left = pixels[:, :, :3].astype(int)
    assert left[0].min() >= 60 and left.max() <= 255  # the opaque half is still there


@pytest.mark.parametrize("mode", ["1", "L", "CMYK", "YCbCr"])
def test_other_modes_decode_to_their_colours(tmp_path, mode):
    colour = {"1": 255, "L": 90, "CMYK": (0, 0, 0, 0), "YCbCr": (128, 128, 128)}[mode]
    path = tmp_path / f"mode-{mode}.{'jpg' if mode in ('CMYK', 'YCbCr') else 'png'}"
    Image.new(mode, (24, 20), colour).save(path)
    expected = {"1": 255, "L": 90, "CMYK": 255, "YCbCr": 128}[mode]
    assert abs(grey_of(load_image(str(path), SIZE)) - expected) <= 3


def test_exif_orientation_is_applied(tmp_path):
    """A photo stored sideways with EXIF orientation 6 (rotate 90 clockwise to view): a red top band
    as viewed is stored as a red left-hand band."""
    stored = Image.new("RGB", (40, 40), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "sideways.jpg"
    stored.save(path, exif=exif, quality=95)
    pixels = load_image(str(path), SIZE).astype(int)
    top, bottom = pixels[:, :2, :], pixels[:, -2:, :]
    assert top[0].mean() > 200 and top[2].mean() < 60  # red on top, as viewed
    assert bottom[2].mean() > 200 and bottom[0].mean() < 60


@pytest.mark.parametrize("shape", [(1, 20000), (20000, 1), (30, 700)])
def test_a_strip_is_a_missing_image_with_one_warning_naming_the_file(tmp_path, caplog, shape):
    """The size guard covers the output and the aspect ratio: a 1 x 20000 JPEG of a few KB took minutes
    and gigabytes when resized by its shorter side."""
    strip = tmp_path / "strip.jpg"
    Image.new("RGB", shape, (200, 10, 10)).save(strip, quality=90)
    ok = tmp_path / "ok.jpg"
    Image.new("RGB", (30, 40), (10, 200, 10)).save(ok, quality=90)
    store = image_store(tmp_path / "cache", [strip, ok])
    with caplog.at_level(logging.WARNING):
        pixels, has_image = store.image_pixels(SIZE)
    assert has_image.tolist() == [False, False, True]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(strip) in warning and f"{shape[0]}x{shape[1]}" in warning and "aspect ratio" in warning
    assert pixels[2][1].min() > 150  # the run went on


def test_a_wide_picture_within_the_limit_costs_no_more_than_its_output(tmp_path):
    """19:1 is decoded; the centre square is resized directly, so no huge intermediate image exists."""
    wide = tmp_path / "wide.png"
    image = Image.new("RGB", (19 * 50, 50), (0, 0, 255))
    image.paste((255, 0, 0), (9 * 50, 0, 10 * 50, 50))  # the centre square is red
    image.save(wide)
    pixels = load_image(str(wide), SIZE).astype(int)
    assert pixels[0].min() > 200 and pixels[2].max() < 60


# --- cache build locks ------------------------------------------------------------------------------------

HOLDER = """
import importlib.util, os, sys, time
# cache_files alone (standard library only): importing the package would cost seconds of torch import
spec = importlib.util.spec_from_file_location("cache_files", "recbole_perpeft/data/cache_files.py")
cache_files = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cache_files)
build_lock = cache_files.build_lock
target, mode = sys.argv[1], sys.argv[2]
with build_lock(target, [target], "the test entry"):
    print("locked", flush=True)
    if mode == "fork-then-exit":  # a child keeps the flock; the recorded holder (this pid) is gone
        child = os.fork()
        if child == 0:
            time.sleep(120)
            os._exit(0)
        print(child, flush=True)
        os._exit(0)
    time.sleep(120)
"""


def start_holder(target: str, mode: str) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, target, mode], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


@pytest.fixture
def lock_timeout():
    def set_to(seconds):
        cache_files.set_lock_timeout(seconds)

    yield set_to
    cache_files.set_lock_timeout(3600)


def test_a_stopped_holder_makes_the_waiter_give_up_naming_pid_and_lock(tmp_path, lock_timeout, caplog):
    target = str(tmp_path / "entry.pt")
    holder = start_holder(target, "hold")
    try:
        os.kill(holder.pid, signal.SIGSTOP)
        lock_timeout(1.0)
        start = time.monotonic()
        with caplog.at_level(logging.INFO), pytest.raises(TimeoutError) as err:
            with build_lock(target, [target], "the test entry"):
                pass
        assert 1.0 <= time.monotonic() - start < 30
    finally:
        os.kill(holder.pid, signal.SIGCONT)
        holder.kill()
        holder.wait(timeout=60)
    message = str(err.value)
    assert f"process {holder.pid}" in message and lock_path(target) in message and "cache_lock_timeout" in message
    assert "stopped" in message and f"kill -CONT {holder.pid}" in message
    (waiting,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Waiting for")]
    assert f"process {holder.pid}" in waiting and lock_path(target) in waiting and "1 s" in waiting


def test_a_lock_whose_holder_is_gone_is_taken_over(tmp_path, lock_timeout, caplog):
    """The holder died but a child it forked still holds the flock: the waiter takes over, with a warning."""
    target = str(tmp_path / "entry.pt")
    holder = start_holder(target, "fork-then-exit")
    child = int(holder.stdout.readline())
    holder.wait(timeout=60)
    lock_timeout(60)
    try:
        with caplog.at_level(logging.WARNING), build_lock(target, [target], "the test entry") as locked:
            assert locked
    finally:
        os.kill(child, signal.SIGKILL)  # the holder's child, still holding the old lock file's flock
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"process {holder.pid}" in warning and "is gone: taking over" in warning
    assert not os.path.exists(lock_path(target))  # released: the lock file is removed


def test_a_killed_holder_leaves_no_lock_behind_after_the_next_build(tmp_path):
    target = str(tmp_path / "entry.pt")
    holder = start_holder(target, "hold")
    holder.kill()
    holder.wait(timeout=60)
    assert os.path.exists(lock_path(target))  # what a SIGKILL leaves
    with build_lock(target, [target], "the test entry") as locked:
        assert locked
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("value", [-1, "soon", True])
def test_cache_lock_timeout_must_be_seconds(value):
    with pytest.raises(ValueError, match="cache_lock_timeout must be a number of seconds"):
        cache_files.set_lock_timeout(value)


# --- a full disk -------------------------------------------------------------------------------------------


def no_space(*args):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_before_decoding_names_path_and_bytes_and_leaves_nothing(tmp_path, monkeypatch):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (20, 20), (i, 50, 90)).save(paths[-1])
    monkeypatch.setattr(os, "posix_fallocate", no_space)
    cache = tmp_path / "cache"
    with pytest.raises(cache_files.DiskFull) as err:
        image_store(cache, paths).image_pixels(SIZE)
    message = str(err.value)
    needed = 4 * 3 * SIZE * SIZE  # 4 rows (padding + 3 items) of pixels, plus the .npy header
    assert message.startswith("disk full writing pixels-") and str(cache) in message
    assert re.search(r"\((\d[\d,]*) bytes needed", message)
    assert int(re.search(r"\((\d[\d,]*) bytes needed", message)[1].replace(",", "")) > needed
    assert [p for p in Path(cache).rglob("*") if p.is_file()] == []  # no temp file, no lock


def test_without_fallocate_free_space_is_checked(tmp_path, monkeypatch):
    path = tmp_path / "array.npy"
    path.write_bytes(b"")
    monkeypatch.delattr(os, "posix_fallocate")
    monkeypatch.setattr(cache_files.shutil, "disk_usage", lambda folder: SimpleNamespace(free=10))
    with pytest.raises(cache_files.DiskFull, match=r"\(1,000 bytes needed, 10 bytes free\)"):
        cache_files.preallocate(str(path), 1000)


@pytest.mark.parametrize("failure", ["enospc", "torch_save"])
def test_a_write_that_fills_the_disk_is_one_line_and_no_temp_file(tmp_path, monkeypatch, failure):
    target = tmp_path / "tokens.pt"
    target.write_bytes(b"old")
    if failure == "torch_save":  # torch.save says only 'file write failed': the free space decides
        monkeypatch.setattr(cache_files.shutil, "disk_usage", lambda folder: SimpleNamespace(free=0))
    with pytest.raises(cache_files.DiskFull, match="disk full writing tokens.pt"):
        with cache_files.atomic_output(str(target)) as tmp:
            Path(tmp).write_bytes(b"half")
            if failure == "enospc":
                no_space()
            raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file")
    assert sorted(os.listdir(tmp_path)) == ["tokens.pt"] and target.read_bytes() == b"old"


# --- data_path for the embedded ml-100k --------------------------------------------------------------------


def test_data_path_is_read_for_the_embedded_ml100k(tmp_path):
    """RecBole reads its bundled ml-100k whatever data_path says (while image_dir followed data_path)."""
    keys = make_atomic_dataset(tmp_path / "data", "ml-100k", with_images=False)
    n_lines = len((tmp_path / "data" / "ml-100k" / "ml-100k.inter").read_text().splitlines()) - 1
    config = Config(model="SASRec", dataset="ml-100k", config_dict=quick_config(tmp_path, **keys, **SMALL_TOPK))
    assert config["data_path"] == str(tmp_path / "data" / "ml-100k")
    assert config["image_dir"] == str(tmp_path / "data" / "ml-100k" / "images")
    assert create_dataset(config).inter_num == n_lines  # the user's 30 users, not RecBole's 100,000 lines


def test_a_data_path_without_ml100k_is_refused(tmp_path):
    with pytest.raises(ValueError) as err:
        Config(model="SASRec", dataset="ml-100k", config_dict={"data_path": str(tmp_path)})
    message = str(err.value)
    assert f"data_path={str(tmp_path)!r} has no ml-100k/ml-100k.inter" in message
    assert "leave data_path out" in message and "ships with RecBole" in message


def test_without_data_path_ml100k_is_recboles_copy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no dataset/ml-100k/ here
    config = Config(model="SASRec", dataset="ml-100k", config_dict={"state": "WARNING"})
    assert os.path.isfile(os.path.join(config["data_path"], "ml-100k.inter"))
    assert os.path.normpath(config["data_path"]).endswith(os.path.join("recbole", "dataset_example", "ml-100k"))


# --- no modality left -----------------------------------------------------------------------------------


def untitled_dataset(tmp_path, with_images: bool):
    from tests.tiny import item_token

    keys = make_atomic_dataset(tmp_path / "data", NAME, with_images=with_images,
                               empty_titles=[item_token(i) for i in range(25)])  # fmt: skip
    return keys


@pytest.mark.parametrize(
    ("with_images", "overrides", "why"),
    [
        (False, {}, "no item has an image file in image_dir="),
        (True, {"modalities": ["text"]}, "the run uses no images (modalities: ['text'])"),
        (False, {"text_field": None}, "no item has an image file"),
    ],
)
def test_no_title_and_no_image_is_refused_before_the_model(tmp_path, with_images, overrides, why):
    """Every title empty and no images: a FrozenMM run crashed in item_inputs (max() of an empty batch),
    others trained on placeholders alone."""
    config = config_of(tmp_path, untitled_dataset(tmp_path, with_images), **overrides)
    dataset = create_dataset(config)
    with pytest.raises(ValueError) as err:
        ItemModalityStore(config, dataset)
    message = str(err.value)
    assert message.startswith("No modality left: ") and why in message
    assert ("text_field is not set" if "text_field" in overrides else f"text_field 'title' of {NAME}.item") in message


def test_no_title_but_images_is_an_image_only_run(tmp_path):
    config = config_of(tmp_path, untitled_dataset(tmp_path, True))
    store = ItemModalityStore(config, create_dataset(config))
    assert not store.has_text.any() and store.image_availability()[1:].all()


def test_a_downloaded_16bit_png_is_stored_as_its_grey_not_white(tmp_path, monkeypatch):
    """The image downloader re-encodes a non-JPEG as JPEG: the same conversion as the decoder's."""
    import io

    from recbole_perpeft.data import images

    body = io.BytesIO()
    Image.fromarray(np.full((20, 24), 32896, dtype=np.uint16)).save(body, format="PNG")
    monkeypatch.setattr(images, "fetch", lambda *args: body.getvalue())
    status = images.save_image("101", "http://x/1.png", tmp_path, 0, 1, 0, images.NetworkWatch())
    assert status == "downloaded"
    assert abs(grey_of(load_image(str(tmp_path / "101.jpg"), SIZE)) - 128) <= 2


def test_a_time_field_in_load_col_but_not_in_the_file_is_said(tmp_path, caplog):
    keys = make_atomic_dataset(tmp_path / "data", NAME, with_images=False)
    inter = tmp_path / "data" / NAME / f"{NAME}.inter"
    rows = [line.rsplit("\t", 1)[0] for line in inter.read_text().splitlines()]
    inter.write_text("\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING):
        dataset = create_dataset(config_of(tmp_path, keys))
    assert dataset.inter_num == len(rows) - 1
    (warning,) = [r.getMessage() for r in caplog.records if "TIME_FIELD" in r.getMessage()]
    assert warning.startswith(f"{NAME}.inter has no column 'timestamp'") and "order of the file" in warning


def test_load_col_without_inter_is_refused(tmp_path):
    keys = make_atomic_dataset(tmp_path / "data", NAME, with_images=False)
    keys["load_col"] = {"iuaer": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title"]}
    with pytest.raises(ValueError, match=r"load_col has no 'inter' entry .*iuaer.* add e\.g\. inter: "):
        create_dataset(config_of(tmp_path, keys))


def test_a_full_disk_before_layer_states_leaves_no_partial_file(tmp_path, monkeypatch):
    from tests.test_caches import FakeImageEncoder, build_layer_states

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (20, 20), (i, 50, 90)).save(paths[-1])
    cache = tmp_path / "cache"
    store = image_store(cache, paths)
    pixels, has_image = store.image_pixels(SIZE)
    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(cache_files.DiskFull, match=r"disk full writing .*\.partial\.npy .*bytes needed"):
        build_layer_states(image_store(cache, paths), pixels, has_image, FakeImageEncoder())
    left = sorted(p.name for p in Path(cache).rglob("*") if p.is_file())
    assert left == sorted(p.name for p in Path(cache).rglob("pixels-*"))  # only the finished pixel cache
