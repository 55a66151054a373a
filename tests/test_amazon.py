"""The Amazon Reviews 2023 pipeline against a local HTTP server: download (resume, mirrors, offline
errors), the paper's preprocessing (seeded user subsample, iterative 5-core, time order, title and
image rules), the image downloader and report, and a full download -> preprocess -> train run."""

from __future__ import annotations

import gzip
import io
import json
import socket
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from recbole_perpeft.data.amazon import iterative_k_core, keep_user, pick_image_url, preprocess
from recbole_perpeft.data.amazon_download import (
    DatasetUnavailableError,
    IncompleteDownload,
    download_file,
    download_with_mirrors,
)
from recbole_perpeft.data.images import download_images
from recbole_perpeft.data.prepare import ensure_atomic_files, main
from tests.amazon_fixtures import (
    CATEGORY,
    FixtureServer,
    gzip_lines,
    image_entry,
    jpeg_bytes,
    make_amazon_raw,
    meta,
    raw_paths,
    review,
    serve_amazon,
)

DATASET = "amazon-arts"  # its real YAML (category Arts_Crafts_and_Sewing), served locally


@pytest.fixture(scope="module")
def raw():
    return make_amazon_raw()


def read_atomic(path: Path) -> pd.DataFrame:
    """As RecBole reads an atomic file (pandas' python csv engine, strings)."""
    return pd.read_csv(path, delimiter="\t", dtype=str, engine="python", keep_default_na=False)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# --- download -----------------------------------------------------------------------------------------


def test_download_resumes_a_part_file_with_a_range_request(tmp_path, raw):
    path, _ = raw_paths()
    dest = tmp_path / "reviews.jsonl.gz"
    Path(str(dest) + ".part").write_bytes(raw.reviews[:1000])
    with FixtureServer({path: raw.reviews}) as server:
        download_file(server.url(path), dest, show_progress=False)
    assert server.requests == [(path, "bytes=1000-")]
    assert dest.read_bytes() == raw.reviews
    assert not Path(str(dest) + ".part").exists()


def test_download_resumes_after_a_cut_connection(tmp_path, raw):
    path, _ = raw_paths()
    dest = tmp_path / "reviews.jsonl.gz"
    with FixtureServer({path: raw.reviews}, cut_once={path}) as server:
        with pytest.raises((IncompleteDownload, OSError)):  # one attempt: the .part keeps half
            download_file(server.url(path), dest, show_progress=False)
        half = Path(str(dest) + ".part").stat().st_size
        assert 0 < half < len(raw.reviews) and not dest.exists()
        download_with_mirrors(path.lstrip("/"), dest, [closed_port_url(), server.base_url], show_progress=False)
    assert server.requests == [(path, None), (path, f"bytes={half}-")]
    assert dest.read_bytes() == raw.reviews


def test_download_refuses_a_body_that_is_not_gzip(tmp_path):
    with FixtureServer({"/f.jsonl.gz": b"<html>maintenance</html>"}) as server:
        with pytest.raises(OSError, match="not a gzip"):
            download_with_mirrors("f.jsonl.gz", tmp_path / "f.jsonl.gz", [server.base_url], attempts=1)
    assert not list(tmp_path.iterdir())  # neither the file nor a .part to resume from


def amazon_config(tmp_path, **overrides) -> dict:
    """What create_dataset's hook passes: a final dict whose data_path is already the dataset's folder."""
    return {
        "dataset": DATASET,
        "data_path": str(tmp_path / "data" / DATASET),
        "amazon_category": CATEGORY,
        "raw_user_sample_ratio": 1.0,
        "seed": 2024,
        "show_progress": False,
        **overrides,
    }


def check_offline_message(message: str, tmp_path: Path) -> None:
    raw_dir = tmp_path / "data" / DATASET / "raw"
    assert f"{CATEGORY}.jsonl.gz" in message and f"meta_{CATEGORY}.jsonl.gz" in message
    assert str(raw_dir) in message
    assert f"recbole-perpeft prepare --dataset={DATASET}" in message


def test_no_download_names_the_files_the_folder_and_the_command(tmp_path):
    with pytest.raises(DatasetUnavailableError) as err:
        ensure_atomic_files(amazon_config(tmp_path, download=False))
    check_offline_message(str(err.value), tmp_path)
    assert "download is False" in str(err.value)


def test_unreachable_server_names_the_files_the_folder_and_the_command(tmp_path):
    with pytest.raises(DatasetUnavailableError) as err:
        ensure_atomic_files(amazon_config(tmp_path, amazon_base_urls=[closed_port_url()]))
    check_offline_message(str(err.value), tmp_path)
    assert "download failed" in str(err.value)
    assert not (tmp_path / "data" / DATASET / f"{DATASET}.inter").exists()


def test_cli_reports_the_offline_error(tmp_path, capsys):
    assert main([f"--dataset={DATASET}", f"--data_path={tmp_path / 'data'}", "--download", "false"]) == 1
    check_offline_message(capsys.readouterr().err, tmp_path)


# --- preprocessing rules ------------------------------------------------------------------------------


def test_user_subsampling_is_seeded_and_deterministic():
    users = [f"A{i:05d}XYZ" for i in range(4000)]
    kept = {seed: {u for u in users if keep_user(u, 0.4, seed)} for seed in (1, 2)}
    assert kept[1] == {u for u in users if keep_user(u, 0.4, 1)}  # same seed, same users
    assert kept[1] != kept[2]
    assert all(abs(len(k) / len(users) - 0.4) < 0.04 for k in kept.values())
    assert all(keep_user(u, 1.0, 1) for u in users[:10])
    assert {u for u in users if keep_user(u, 0.2, 1)} <= kept[1]  # a smaller ratio keeps a subset


def chain_case() -> list[tuple[str, str]]:
    """u1..u5 x i1..i5 is the 5-core. v, w1..w3 buy x, y, i1..i3: x (4 buyers) goes in pass 1, which
    leaves v/w with 4 purchases (pass 2), which leaves y with one buyer (pass 3)."""
    pairs = [(f"u{u}", f"i{i}") for u in range(1, 6) for i in range(1, 6)] + [("u1", "y")]
    pairs += [(user, item) for user in ("v", "w1", "w2", "w3") for item in ("x", "y", "i1", "i2", "i3")]
    return pairs


def test_iterative_k_core_repeats_until_stable(tmp_path):
    pairs = chain_case()
    users = np.array([int.from_bytes(u.encode(), "big") % 1000 for u, _ in pairs])
    items = np.array([int.from_bytes(i.encode(), "big") % 1000 for _, i in pairs])
    keep, passes = iterative_k_core(users, items)
    assert passes == 3
    assert {pairs[k] for k in np.flatnonzero(keep)} == {(f"u{u}", f"i{i}") for u in range(1, 6) for i in range(1, 6)}

    # The same through the raw files.
    (tmp_path / "r.jsonl.gz").write_bytes(gzip_lines([review(u, i, 1000 + n) for n, (u, i) in enumerate(pairs)]))
    (tmp_path / "m.jsonl.gz").write_bytes(gzip_lines([meta(f"i{i}", f"item {i}", []) for i in range(1, 6)]))
    out = tmp_path / "out"
    manifest = preprocess(tmp_path / "r.jsonl.gz", tmp_path / "m.jsonl.gz", out, "chain", 1.0, 0, show_progress=False)
    inter = read_atomic(out / "chain.inter")
    assert set(inter["user_id:token"]) == {f"u{u}" for u in range(1, 6)}
    assert set(inter["item_id:token"]) == {f"i{i}" for i in range(1, 6)}
    assert manifest["counts"]["k_core_passes"] == 3 and manifest["counts"]["interactions"] == 25


def test_image_url_rules_large_then_hi_res_then_thumb_first_entry_wins():
    both = [
        image_entry(thumb="http://a/t1", large="http://a/l1", hi_res="http://a/h1"),
        image_entry(large="http://a/l2"),
    ]
    assert pick_image_url(both) == "http://a/l1"
    no_first_large = [image_entry(thumb="http://a/t1", hi_res="http://a/h1"), image_entry(large="http://a/l2")]
    assert pick_image_url(no_first_large) == "http://a/l2"
    assert pick_image_url([image_entry(thumb="http://a/t1"), image_entry(hi_res="http://a/h2")]) == "http://a/h2"
    assert pick_image_url([image_entry(thumb="http://a/t1"), image_entry(thumb="http://a/t2")]) == "http://a/t1"
    assert pick_image_url([]) is None and pick_image_url(None) is None
    # The Hugging Face copy stores images as a dict of lists.
    assert pick_image_url({"thumb": ["http://a/t1"], "large": ["http://a/l1"], "hi_res": [None]}) == "http://a/l1"


def write_raw(tmp_path: Path, raw) -> tuple[Path, Path]:
    (tmp_path / "r.jsonl.gz").write_bytes(raw.reviews)
    (tmp_path / "m.jsonl.gz").write_bytes(raw.meta)
    return tmp_path / "r.jsonl.gz", tmp_path / "m.jsonl.gz"


def test_preprocess_subsample_depends_on_the_seed_only(tmp_path, raw):
    reviews, meta_file = write_raw(tmp_path, raw)
    users = {}
    for run, seed in (("a", 1), ("b", 1), ("c", 2)):
        preprocess(reviews, meta_file, tmp_path / run, "x", 0.5, seed, show_progress=False)
        users[run] = (tmp_path / run / "x.inter").read_text()
    assert users["a"] == users["b"]
    assert users["a"] != users["c"]


def test_prepare_downloads_preprocesses_and_fetches_images(tmp_path, raw):
    data = tmp_path / "data"
    folder = data / DATASET
    with serve_amazon(raw) as server:
        args = [
            f"--dataset={DATASET}",
            f"--data_path={data}",
            f"--base_url={server.base_url}",
            "--raw_user_sample_ratio=1.0",
        ]
        assert main(args) == 0
        first_requests = list(server.requests)
        report = json.loads((folder / "image_report.json").read_text())
        assert main(args) == 0  # a rerun: raw files and verified images are not fetched again
        rerun_requests = server.requests[len(first_requests) :]
        rerun_report = json.loads((folder / "image_report.json").read_text())

    # Raw files: downloaded once, byte-identical to what was served.
    reviews_path, meta_path = raw_paths()
    assert (folder / "raw" / f"{CATEGORY}.jsonl.gz").read_bytes() == raw.reviews
    assert (folder / "raw" / f"meta_{CATEGORY}.jsonl.gz").read_bytes() == server.files[meta_path]
    assert not list(folder.glob("**/*.part")) and not (folder / f"{DATASET}.inter.staged").exists()

    # Users and items: the 5-core removed the sparse users and the rare item; time order per user.
    inter = read_atomic(folder / f"{DATASET}.inter")
    assert list(inter.columns) == ["user_id:token", "item_id:token", "timestamp:float"]
    got = {u: list(g["item_id:token"]) for u, g in inter.groupby("user_id:token", sort=False)}
    assert got == raw.sequences  # exact order; the duplicated review line counted once
    for _, g in inter.groupby("user_id:token"):
        times = g["timestamp:float"].astype(np.int64).to_numpy()
        assert (np.diff(times) > 0).all()
    assert inter["user_id:token"].value_counts().min() >= 5 and inter["item_id:token"].value_counts().min() >= 5

    # Titles: sanitised, empty where missing; every item of .inter listed once.
    items = read_atomic(folder / f"{DATASET}.item")
    assert list(items.columns) == ["item_id:token", "title:token_seq"]
    assert set(items["item_id:token"]) == set(inter["item_id:token"]) and items["item_id:token"].is_unique
    assert dict(zip(items["item_id:token"], items["title:token_seq"], strict=True)) == raw.titles

    # Image URLs: the selection rules; images by item id, the failures reported and absent.
    urls = dict(line.split("\t") for line in (folder / "image_urls.tsv").read_text().splitlines()[1:])
    assert urls == {item: server.url(path) for item, path in raw.image_url.items() if path}
    failed = {raw.broken_image_item, raw.missing_image_item, *raw.no_url_items}
    assert set(report["failed"]) == failed
    assert "no image URL" in report["failed"][raw.no_url_items[0]]["error"]
    assert "404" in report["failed"][raw.missing_image_item]["error"]
    assert "decodable" in report["failed"][raw.broken_image_item]["error"]
    on_disk = {p.stem for p in (folder / "images").iterdir()}
    assert on_disk == set(raw.titles) - failed  # no temp files left, names from item ids only
    for item in on_disk:
        with Image.open(folder / "images" / f"{item}.jpg") as img:
            img.load()
    assert report["downloaded"] == len(on_disk) and report["present"] == 0
    assert rerun_report["present"] == len(on_disk) and set(rerun_report["failed"]) == failed

    # Requests: each raw file once, each image URL once (a 404 is not retried); a rerun only
    # retries the two failed downloads.
    image_paths = [path for path in raw.image_url.values() if path]
    assert sorted(p for p, _ in first_requests) == sorted([reviews_path, meta_path, *image_paths])
    assert sorted(p for p, _ in rerun_requests) == sorted(
        [raw.image_url[raw.broken_image_item], raw.image_url[raw.missing_image_item]]
    )

    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["sources"][f"{CATEGORY}.jsonl.gz"]["bytes"] == len(raw.reviews)
    assert manifest["seed"] == 2024 and manifest["raw_user_sample_ratio"] == 1.0
    counts = manifest["counts"]
    assert (counts["users"], counts["items"]) == (len(raw.sequences), len(raw.titles))
    assert counts["duplicate_reviews"] == 1 and counts["skipped_lines"] == 1
    assert manifest["paper"] == {"users": 24_511, "items": 18_884}


def test_interrupted_preparation_resumes_without_preprocessing_again(tmp_path, raw, monkeypatch):
    import recbole_perpeft.data.prepare as prepare_module

    config = amazon_config(tmp_path)
    folder = Path(config["data_path"])
    with serve_amazon(raw) as server:
        config["amazon_base_urls"] = [server.base_url]

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(prepare_module, "download_images", interrupted)
        with pytest.raises(KeyboardInterrupt):
            ensure_atomic_files(config)
        assert (folder / f"{DATASET}.inter.staged").is_file() and not (folder / f"{DATASET}.inter").exists()
        monkeypatch.undo()
        calls = []
        monkeypatch.setattr(prepare_module, "preprocess", lambda *a, **k: calls.append(a))
        assert ensure_atomic_files(config)
    assert not calls  # the staged preprocessing was reused
    assert (folder / f"{DATASET}.inter").is_file() and (folder / "image_report.json").is_file()


# --- images ------------------------------------------------------------------------------------------


def test_images_skip_verified_files_replace_corrupt_ones_and_store_jpeg(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (9, 7), (0, 200, 0)).save(png, format="PNG")
    files = {"/a.jpg": jpeg_bytes((10, 20, 30)), "/b.jpg": jpeg_bytes((40, 50, 60)), "/c.png": png.getvalue()}
    images = tmp_path / "images"
    images.mkdir()
    (images / "I1.jpg").write_bytes(jpeg_bytes((1, 2, 3)))  # verified: kept, not fetched
    (images / "I2.jpg").write_bytes(jpeg_bytes((4, 5, 6))[:40])  # truncated: fetched again
    with FixtureServer(files) as server:
        urls = {"I1": server.url("/a.jpg"), "I2": server.url("/b.jpg"), "I3": server.url("/c.png?w=9")}
        report = download_images(urls, images, tmp_path / "report.json", workers=2, show_progress=False)
    assert sorted(server.paths_requested()) == ["/b.jpg", "/c.png"]
    assert (report["present"], report["downloaded"], report["failed"]) == (1, 2, {})
    assert (images / "I2.jpg").read_bytes() == files["/b.jpg"]
    with Image.open(images / "I3.jpg") as img:
        assert img.format == "JPEG" and img.size == (9, 7)
    assert sorted(p.name for p in images.iterdir()) == ["I1.jpg", "I2.jpg", "I3.jpg"]


def test_images_from_an_unreachable_host_fail_fast_and_are_reported(tmp_path):
    base = closed_port_url()
    urls = {f"I{i}": f"{base}/img/{i}.jpg" for i in range(60)}
    start = time.monotonic()
    report = download_images(urls, tmp_path / "images", tmp_path / "report.json", workers=4, show_progress=False)
    assert time.monotonic() - start < 10
    assert set(report["failed"]) == set(urls) and not list((tmp_path / "images").iterdir())
    assert json.loads((tmp_path / "report.json").read_text()) == report


# --- the whole path ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_download_preprocess_train(tmp_path, raw, in_tmp_path):
    from recbole_perpeft.quick_start import run
    from tests.tiny import quick_config

    with serve_amazon(raw) as server:
        config = quick_config(
            tmp_path,
            data_path=str(tmp_path / "data"),
            amazon_base_urls=[server.base_url],
            raw_user_sample_ratio=0.8,
            foundation_model="text_image",  # no CLIP offline
            adapt_image_tower=False,
            topk=[5, 10],
            valid_metric="hit@10",
            state="WARNING",
        )
        result = run("GlobalPEFT", DATASET, config_dict=config, result_file=str(tmp_path / "result.json"))
    written = json.loads((tmp_path / "result.json").read_text())
    assert {"hit@5", "hit@10", "ndcg@10"} <= set(written["test_result"])
    assert 0 <= result["test_result"]["hit@10"] <= 1
    folder = tmp_path / "data" / DATASET
    n_users = len(read_atomic(folder / f"{DATASET}.inter")["user_id:token"].unique())
    assert 0.6 * len(raw.sequences) < n_users < len(raw.sequences)  # the seeded 80%
    assert written["config"]["image_dir"] == str(folder / "images") and any((folder / "images").iterdir())
    with gzip.open(folder / "raw" / f"{CATEGORY}.jsonl.gz") as f:
        assert sum(1 for _ in f) > len(raw.sequences) * 7
