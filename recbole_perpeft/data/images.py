"""Item images from URLs to ``image_dir/{item_id}.jpg``, concurrently, retried and resumable.

The file name comes from the item token, never from the URL. Every file is written to a temporary
name, decoded with PIL and only then renamed, so an image on disk is an image that decodes; a
rerun skips those. A failure (HTTP error, no URL, undecodable bytes) is recorded in
``image_report.json`` and the item simply has no image (the model substitutes a placeholder):
one bad image never aborts a dataset of thousands.
"""

from __future__ import annotations

import io
import json
import os
import socket
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from logging import getLogger
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from PIL import Image, ImageOps
from tqdm import tqdm

from recbole_perpeft.data.image_decoding import to_rgb

logger = getLogger(__name__)

USER_AGENT = "recbole-perpeft/0.1 (dataset preparation)"
MAX_IMAGE_BYTES = 20 << 20  # an item image is KBs; anything this large is not one


def decodes(path: Path) -> bool:
    """Whether PIL decodes the whole file (``verify`` alone misses truncated JPEG data)."""
    try:
        with Image.open(path) as img:
            img.load()
        return True
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def safe_file_name(item_id: str) -> bool:
    return bool(item_id) and item_id not in (".", "..") and not any(c in item_id for c in "/\\\0")


class NetworkWatch:
    """Counts network failures (no HTTP answer at all) and successes across the workers. After
    ``limit`` failures without one success the host is taken as unreachable and the remaining items
    fail at once (a rerun retries them), instead of each waiting out its retries."""

    def __init__(self, limit: int = 20):
        self.limit, self.failures, self.successes = limit, 0, 0
        self.lock = threading.Lock()

    def record(self, ok: bool) -> None:
        with self.lock:
            self.successes += ok
            self.failures += not ok

    @property
    def unreachable(self) -> bool:
        return self.successes == 0 and self.failures >= self.limit


def fetch(url: str, retries: int, timeout: float, backoff: float, watch: NetworkWatch) -> bytes:
    """The body of ``url``; transient failures (dropped connections, timeouts, 5xx, 429) retried
    with exponential backoff; no such host / connection refused is not retried."""
    for attempt in range(retries + 1):
        if watch.unreachable:
            raise ConnectionError("skipped: the image host looks unreachable (no image downloaded so far)")
        try:
            with urlopen(Request(url, headers={"User-Agent": USER_AGENT}), timeout=timeout) as resp:
                body = resp.read(MAX_IMAGE_BYTES + 1)
            watch.record(True)
            if len(body) > MAX_IMAGE_BYTES:
                raise ValueError(f"larger than {MAX_IMAGE_BYTES} bytes")
            return body
        except HTTPError as err:
            watch.record(True)  # the host answered
            if attempt == retries or (err.code < 500 and err.code != 429):
                raise
        except (URLError, OSError) as err:
            watch.record(False)
            if attempt == retries or isinstance(getattr(err, "reason", err), (socket.gaierror, ConnectionRefusedError)):
                raise
        time.sleep(backoff * 2**attempt)
    raise AssertionError("unreachable")


def save_image(
    item_id: str, url: str | None, image_dir: Path, retries: int, timeout: float, backoff: float, watch: NetworkWatch
) -> str:
    """'present', 'downloaded', or raises with the reason the item has no image."""
    if not url:
        raise LookupError("no image URL")
    if not safe_file_name(item_id):
        raise ValueError(f"item id {item_id!r} cannot be a file name")
    path = image_dir / f"{item_id}.jpg"
    if path.is_file() and decodes(path):
        return "present"
    body = fetch(url, retries, timeout, backoff, watch)
    tmp = image_dir / f".{item_id}.jpg.tmp"
    try:
        with Image.open(io.BytesIO(body)) as img:
            img.load()
            if img.format != "JPEG":  # a PNG/GIF/WebP: store a real JPEG under the .jpg name
                out = io.BytesIO()
                # upright, deep greyscale scaled and transparency over white (convert("RGB") made a
                # 16-bit PNG pure white); a JPEG is kept as sent, its EXIF orientation applied on decoding
                to_rgb(ImageOps.exif_transpose(img)).save(out, format="JPEG", quality=95)
                body = out.getvalue()
        tmp.write_bytes(body)
        if not decodes(tmp):
            raise ValueError("does not decode after writing")
        os.replace(tmp, path)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"not a decodable image ({err})") from err
    finally:
        tmp.unlink(missing_ok=True)
    return "downloaded"


def download_images(
    urls: Mapping[str, str | None],
    image_dir: Path,
    report_path: Path,
    workers: int = 8,
    retries: int = 2,
    timeout: float = 30,
    backoff: float = 1.0,
    show_progress: bool = True,
) -> dict:
    """Each ``urls[item_id]`` to ``image_dir/{item_id}.jpg``; writes and returns the report:
    ``{"items", "downloaded", "present", "failed": {item_id: {"url", "error"}}}``."""
    image_dir.mkdir(parents=True, exist_ok=True)
    report = {"items": len(urls), "downloaded": 0, "present": 0, "failed": {}}
    watch = NetworkWatch()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {
            pool.submit(save_image, item, url, image_dir, retries, timeout, backoff, watch): item
            for item, url in urls.items()
        }
        for future in tqdm(as_completed(futures), total=len(futures), desc="Item images", disable=not show_progress):
            item = futures[future]
            try:
                report[future.result()] += 1
            except Exception as err:  # noqa: BLE001 - any failure is one missing image, never an abort
                reason = f"HTTP {err.code}" if isinstance(err, HTTPError) else str(getattr(err, "reason", err))
                report["failed"][item] = {"url": urls[item], "error": f"{type(err).__name__}: {reason}"}
    report["failed"] = dict(sorted(report["failed"].items()))
    tmp = report_path.with_name(report_path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, report_path)
    logger.info(
        f"Images in {image_dir}: {report['downloaded']} downloaded, {report['present']} already there, "
        f"{len(report['failed'])} missing (see {report_path}); missing images get a learned placeholder."
    )
    return report
