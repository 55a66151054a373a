"""Amazon Reviews 2023 (the paper's datasets): the raw files' download, and the paper's preprocessing.

Raw files (https://amazon-reviews-2023.github.io): per category, reviews ``{Category}.jsonl.gz``
(``user_id``, ``parent_asin``, ``timestamp`` in ms, ...) and metadata ``meta_{Category}.jsonl.gz``
(``parent_asin``, ``title``, ``images`` [{``thumb``, ``large``, ``variant``, ``hi_res``}], ...). They
are GBs: downloads stream to a ``.part`` file, resume with an HTTP Range request, and are renamed only
when complete; preprocessing streams the gzip lines and keeps only the fields it needs.

Preprocessing (paper App. B.2): user = ``user_id``, item = ``parent_asin``, time = ``timestamp``;
a seeded subsample of users; iteratively keep users and items with >= 5 purchases until nothing
changes; each user's purchases in time order; title = the metadata's ``title``; image = the first
``large`` URL of the metadata's ``images`` (else the first ``hi_res``, else the first ``thumb``).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import re
import socket
import time
from array import array
from collections.abc import Iterator, Sequence
from logging import getLogger
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

import numpy as np
from tqdm import tqdm

from recbole_perpeft.data.importers import clean_title, write_atomic_files

logger = getLogger(__name__)

DEFAULT_BASE_URLS = (
    "https://mcauleylab.ucsd.edu/public_datasets/data",
    "https://datarepo.eng.ucsd.edu/mcauley_group/data",
)
REVIEWS_PATH = "amazon_2023/raw/review_categories/{category}.jsonl.gz"
META_PATH = "amazon_2023/raw/meta_categories/meta_{category}.jsonl.gz"
IMAGE_KEYS = ("large", "hi_res", "thumb")  # preference order of a metadata image's URLs
MIN_PURCHASES = 5
USER_AGENT = "recbole-perpeft/0.1 (dataset preparation)"

# The paper's Table 1 after preprocessing (only the numbers we are sure of).
PAPER_STATS = {"amazon-arts": {"users": 24_511, "items": 18_884}}


class DatasetUnavailableError(FileNotFoundError):
    """Raw files that are neither on disk nor downloadable (a FileNotFoundError: the CLI reports it)."""


# --- download -----------------------------------------------------------------------------------------


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
        f"    python -m recbole_perpeft.data.prepare --dataset={dataset} --raw_dir={raw_dir} --data_path={data_root}"
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


# --- preprocessing -------------------------------------------------------------------------------------


def iter_jsonl_gz(path: Path, desc: str, show_progress: bool = True) -> Iterator[dict]:
    """One dict per line, streamed; the progress bar counts compressed bytes (the size is known)."""
    with (
        open(path, "rb") as raw,
        gzip.GzipFile(fileobj=raw) as gz,
        tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=desc, disable=not show_progress) as bar,
    ):
        for n, line in enumerate(gz):
            if line.strip():
                yield json.loads(line)
            if n % 10_000 == 0:
                bar.update(raw.tell() - bar.n)
        bar.update(raw.tell() - bar.n)


def keep_user(user_id: str, ratio: float, seed: int) -> bool:
    """Seeded, deterministic and order-free: a user is kept iff a keyed hash of its id falls under
    ``ratio``, so the decision streams (no list of all users) and is the same on every machine."""
    if ratio >= 1:
        return True
    digest = hashlib.blake2b(user_id.encode(), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "big") < ratio * 2**64


def iterative_k_core(users: np.ndarray, items: np.ndarray, k: int = MIN_PURCHASES) -> tuple[np.ndarray, int]:
    """Mask of the interactions left when users and items with < k of them are removed, repeated
    until nothing changes (one pass is not enough: removing an item can drop a user below k), and
    the number of passes that removed something."""
    keep = np.ones(len(users), dtype=bool)
    n_users, n_items = int(users.max(initial=-1)) + 1, int(items.max(initial=-1)) + 1
    passes = 0
    while True:
        user_count = np.bincount(users[keep], minlength=n_users)
        item_count = np.bincount(items[keep], minlength=n_items)
        new = keep & (user_count[users] >= k) & (item_count[items] >= k)
        if new.sum() == keep.sum():
            return keep, passes
        keep, passes = new, passes + 1


def pick_image_url(images: object) -> str | None:
    """The first ``large`` URL of the metadata's images, else the first ``hi_res``, else the first
    ``thumb``. Accepts the raw files' list of dicts and the Hugging Face copy's dict of lists."""
    if isinstance(images, dict):  # {"large": [...], "hi_res": [...], ...}
        images = [dict(zip(images, values, strict=False)) for values in zip(*images.values(), strict=False)]
    if not isinstance(images, list):
        return None
    for key in IMAGE_KEYS:
        for image in images:
            url = image.get(key) if isinstance(image, dict) else None
            if isinstance(url, str) and url.startswith(("http://", "https://")):
                return url
    return None


class Purchases:
    """The sampled users' purchases as integer arrays (ids interned once): what the 5-core and the
    time sort need, in a fraction of the memory of Python tuples."""

    def __init__(self):
        self.user_ids: dict[str, int] = {}
        self.item_ids: dict[str, int] = {}
        self.users, self.items, self.times = array("q"), array("q"), array("q")

    def add(self, user: str, item: str, timestamp: int) -> None:
        self.users.append(self.user_ids.setdefault(user, len(self.user_ids)))
        self.items.append(self.item_ids.setdefault(item, len(self.item_ids)))
        self.times.append(timestamp)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(np.frombuffer(a, dtype=np.int64) for a in (self.users, self.items, self.times))


def read_reviews(path: Path, ratio: float, seed: int, show_progress: bool = True) -> tuple[Purchases, dict]:
    purchases, counts = Purchases(), {"review_lines": 0, "skipped_lines": 0}
    for review in iter_jsonl_gz(path, "Reading reviews", show_progress):
        counts["review_lines"] += 1
        user, item, ts = review.get("user_id"), review.get("parent_asin"), review.get("timestamp")
        if not user or not item or ts is None:
            counts["skipped_lines"] += 1
            continue
        if user in purchases.user_ids or keep_user(user, ratio, seed):
            purchases.add(user, item, int(ts))
    return purchases, counts


def read_metadata(path: Path, items: set[str], show_progress: bool = True) -> tuple[dict[str, str], dict[str, str]]:
    """Title and image URL of each item of ``items`` (the first metadata line of an item wins)."""
    titles: dict[str, str] = {}
    urls: dict[str, str] = {}
    for meta in iter_jsonl_gz(path, "Reading metadata", show_progress):
        item = meta.get("parent_asin")
        if item not in items or item in titles:
            continue
        titles[item] = clean_title(meta.get("title") or "")
        url = pick_image_url(meta.get("images"))
        if url:
            urls[item] = url
    return titles, urls


def preprocess(
    reviews: Path,
    meta: Path,
    folder: Path,
    dataset: str,
    ratio: float,
    seed: int,
    inter_path: Path | None = None,
    show_progress: bool = True,
) -> dict:
    """Raw files -> ``folder/dataset.item``, ``inter_path`` (default ``folder/dataset.inter``),
    ``folder/image_urls.tsv`` and ``folder/manifest.json``; returns the manifest."""
    purchases, counts = read_reviews(reviews, ratio, seed, show_progress)
    users, items, times = purchases.arrays()
    counts["sampled_users"], counts["sampled_purchases"] = len(purchases.user_ids), len(users)
    # A review listed twice (same user, item and time) is one purchase; repeat purchases stay.
    _, first = np.unique(np.stack([users, items, times]), axis=1, return_index=True)
    unique = np.zeros(len(users), dtype=bool)
    unique[first] = True
    counts["duplicate_reviews"] = int(len(users) - unique.sum())
    users, items, times = users[unique], items[unique], times[unique]
    keep, passes = iterative_k_core(users, items)
    users, items, times = users[keep], items[keep], times[keep]
    order = np.lexsort((np.arange(len(users)), times, users))  # by user, then time, then file order
    users, items, times = users[order], items[order], times[order]

    user_names = np.array(list(purchases.user_ids), dtype=object)
    item_names = np.array(list(purchases.item_ids), dtype=object)
    kept_items = list(dict.fromkeys(item_names[items]))
    titles, urls = read_metadata(meta, set(kept_items), show_progress)
    all_titles = {item: titles.get(item, "") for item in kept_items}
    write_atomic_files(
        folder, dataset, zip(user_names[users], item_names[items], times.tolist(), strict=True), all_titles, inter_path
    )
    write_image_urls(folder / "image_urls.tsv", {item: urls[item] for item in kept_items if item in urls})

    stats = {
        "users": int(len(np.unique(users))),
        "items": len(kept_items),
        "interactions": int(len(users)),
        "k_core_passes": passes,
        "items_without_title": sum(not t for t in all_titles.values()),
        "items_without_metadata": len(kept_items) - len(titles),
        "items_without_image_url": len(kept_items) - sum(item in urls for item in kept_items),
    }
    manifest = {
        "dataset": dataset,
        "sources": {p.name: {"path": str(p), "bytes": p.stat().st_size} for p in (reviews, meta)},
        "raw_user_sample_ratio": ratio,
        "seed": seed,
        "min_purchases": MIN_PURCHASES,
        "counts": {**counts, **stats},
        "paper": PAPER_STATS.get(dataset),
    }
    write_manifest(folder, manifest)
    log_statistics(dataset, stats)
    return manifest


def write_image_urls(path: Path, urls: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("item_id\turl\n")
        f.writelines(f"{item}\t{url}\n" for item, url in urls.items())
    os.replace(tmp, path)


def read_image_urls(path: Path) -> dict[str, str]:
    with open(path, encoding="utf-8") as f:
        next(f, None)
        return dict(line.rstrip("\n").split("\t", 1) for line in f if "\t" in line)


def write_manifest(folder: Path, manifest: dict) -> None:
    tmp = folder / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, folder / "manifest.json")


def log_statistics(dataset: str, stats: dict) -> None:
    paper = PAPER_STATS.get(dataset)
    lines = [f"{dataset}: {'':10}{'ours':>10}{'paper':>10}"]
    for key in ("users", "items", "interactions"):
        theirs = f"{paper[key]:,}" if paper and key in paper else "-"
        lines.append(f"{'':{len(dataset) + 2}}{key:10}{stats[key]:>10,}{theirs:>10}")
    lines.append(
        f"(5-core in {stats['k_core_passes']} passes; {stats['items_without_title']} items without title, "
        f"{stats['items_without_image_url']} without image URL)"
    )
    logger.info("\n".join(lines))
