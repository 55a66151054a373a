"""Amazon Reviews 2023 (the paper's datasets): the raw files' download (preprocessing: amazon.py).

Raw files (https://amazon-reviews-2023.github.io): per category, reviews ``{Category}.jsonl.gz`` and
metadata ``meta_{Category}.jsonl.gz``, from the first of several mirrors that delivers. They are GBs:
downloads stream to a ``.part`` file, resume with an HTTP Range request, and are renamed only when
complete (and gzip: an HTML error page is never taken for the data).
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import time
from collections.abc import Sequence
from logging import getLogger
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from tqdm import tqdm

logger = getLogger(__name__)

DEFAULT_BASE_URLS = (
    "https://mcauleylab.ucsd.edu/public_datasets/data",
    "https://datarepo.eng.ucsd.edu/mcauley_group/data",
)
REVIEWS_PATH = "amazon_2023/raw/review_categories/{category}.jsonl.gz"
META_PATH = "amazon_2023/raw/meta_categories/meta_{category}.jsonl.gz"
USER_AGENT = "recbole-perpeft/0.1 (dataset preparation)"


class DatasetUnavailableError(FileNotFoundError):
    """Raw files that are neither on disk nor downloadable (a FileNotFoundError: the CLI reports it)."""


def raw_file_names(category: str) -> tuple[str, str]:
    return f"{category}.jsonl.gz", f"meta_{category}.jsonl.gz"


def raw_urls(base: str, category: str) -> tuple[str, str]:
    base = base.rstrip("/")
    return f"{base}/{REVIEWS_PATH.format(category=category)}", f"{base}/{META_PATH.format(category=category)}"


class IncompleteDownload(OSError):
    """Fewer bytes than announced: the ``.part`` file is kept for the next attempt to resume."""


def _total_from_content_range(value: str | None) -> int | None:
    match = re.match(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+)", value or "")
    return int(match.group(2)) if match else None


def download_file(url: str, dest: Path, timeout: float = 60, show_progress: bool = True) -> Path:
    """One attempt at ``url`` -> ``dest``, resuming ``dest.part`` with a Range request. The
    ``.part`` is renamed to ``dest`` only when its size is the announced one and it is gzip."""
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": USER_AGENT, **({"Range": f"bytes={offset}-"} if offset else {})}
    try:
        resp = urlopen(Request(url, headers=headers), timeout=timeout)
    except HTTPError as err:
        total = _total_from_content_range(err.headers.get("Content-Range")) if err.code == 416 else None
        if err.code == 416 and total == offset:  # the .part was already complete
            return _finish(part, dest, offset)
        if err.code == 416:
            part.unlink()  # larger than the file: start again next attempt
        raise
    with resp:
        if offset and resp.status == 206:
            total = _total_from_content_range(resp.headers.get("Content-Range"))
            start = int(re.match(r"bytes\s+(\d+)", resp.headers.get("Content-Range", "bytes 0")).group(1))
            if start != offset:
                raise IncompleteDownload(f"{url}: asked for bytes {offset}-, got {resp.headers['Content-Range']}")
        else:  # no resume (or the server ignored the Range): from the start
            offset = 0
            length = resp.headers.get("Content-Length")
            total = int(length) if length is not None else None
        dest.parent.mkdir(parents=True, exist_ok=True)
        with (
            open(part, "ab" if offset else "wb") as f,
            tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, desc=dest.name, disable=not show_progress
            ) as bar,
        ):
            try:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
            except http.client.HTTPException as err:  # e.g. IncompleteRead: what arrived stays in the .part
                raise IncompleteDownload(f"{url}: connection broken ({err!r})") from err
    size = part.stat().st_size
    if total is not None and size != total:
        raise IncompleteDownload(f"{url}: {size} of {total} bytes received")
    return _finish(part, dest, size)


def _finish(part: Path, dest: Path, size: int) -> Path:
    with open(part, "rb") as f:
        if f.read(2) != b"\x1f\x8b":
            part.unlink()  # an HTML error page or similar: never resume from it
            raise IncompleteDownload(f"{dest.name}: the server's {size} bytes are not a gzip file")
    os.replace(part, dest)
    return dest


def download_with_mirrors(
    path_in_base: str,
    dest: Path,
    base_urls: Sequence[str],
    attempts: int = 3,
    timeout: float = 60,
    show_progress: bool = True,
    backoff: float = 2.0,
) -> Path:
    """Try each base URL ``attempts`` times (each attempt resumes the ``.part``); OSError with every
    failure if none delivers."""
    errors = []
    for base in base_urls:
        url = f"{base.rstrip('/')}/{path_in_base}"
        for attempt in range(attempts):
            try:
                return download_file(url, dest, timeout=timeout, show_progress=show_progress)
            except HTTPError as err:
                errors.append(f"{url}: HTTP {err.code}")
                if err.code != 416 and 400 <= err.code < 500:
                    break  # not there: the next mirror
            except (URLError, OSError, http.client.HTTPException) as err:
                reason = getattr(err, "reason", err)
                errors.append(f"{url} (attempt {attempt + 1}): {reason}")
                if isinstance(reason, (socket.gaierror, ConnectionRefusedError)):
                    break  # no such host / nothing listening: retrying will not help, the next mirror may
                if attempt + 1 < attempts:
                    time.sleep(backoff * 2**attempt)  # a dropped connection: resume after a pause
    raise OSError("; ".join(errors) or "no base URL given")


def unavailable_message(
    dataset: str,
    category: str,
    missing: Sequence[str],
    raw_dir: Path,
    data_root: Path,
    base_urls: Sequence[str],
    why: str,
) -> str:
    reviews, meta = raw_urls(base_urls[0] if base_urls else DEFAULT_BASE_URLS[0], category)
    return (
        f"Dataset '{dataset}': the Amazon Reviews 2023 raw files {', '.join(missing)} are not in {raw_dir} ({why}).\n"
        f"Put them in {raw_dir}, e.g.\n"
        f"    mkdir -p {raw_dir} && cd {raw_dir} && wget {reviews} {meta}\n"
        "then prepare the dataset by hand (or just rerun; it is prepared on first use):\n"
        f"    recbole-perpeft prepare --dataset={dataset} --raw_dir={raw_dir} --data_path={data_root}"
    )


def fetch_raw_files(
    dataset: str,
    category: str,
    raw_dir: Path,
    data_root: Path,
    base_urls: Sequence[str],
    download: bool,
    show_progress: bool = True,
) -> tuple[Path, Path]:
    """The two raw files in ``raw_dir``, downloaded if missing and allowed; else a clear error."""
    names = raw_file_names(category)
    missing = [n for n in names if not (raw_dir / n).is_file()]
    if missing and not download:
        raise DatasetUnavailableError(
            unavailable_message(dataset, category, missing, raw_dir, data_root, base_urls, "download is False")
        )
    for name, path in zip(names, (REVIEWS_PATH, META_PATH), strict=True):
        if name in missing:
            logger.info(f"Downloading {name} to {raw_dir} (from {', '.join(base_urls)})")
            try:
                download_with_mirrors(
                    path.format(category=category), raw_dir / name, base_urls, show_progress=show_progress
                )
            except OSError as err:
                raise DatasetUnavailableError(
                    unavailable_message(
                        dataset, category, missing, raw_dir, data_root, base_urls, f"the download failed: {err}"
                    )
                ) from err
    return raw_dir / names[0], raw_dir / names[1]
