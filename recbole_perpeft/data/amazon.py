"""Amazon Reviews 2023 (the paper's datasets): the paper's preprocessing of the raw files (their
download: amazon_download.py).

Raw files (https://amazon-reviews-2023.github.io): per category, reviews ``{Category}.jsonl.gz``
(``user_id``, ``parent_asin``, ``timestamp`` in ms, ...) and metadata ``meta_{Category}.jsonl.gz``
(``parent_asin``, ``title``, ``images`` [{``thumb``, ``large``, ``variant``, ``hi_res``}], ...). They
are GBs: preprocessing streams the gzip lines and keeps only the fields it needs.

Preprocessing (paper App. B.2): user = ``user_id``, item = ``parent_asin``, time = ``timestamp``;
a seeded subsample of users; iteratively keep users and items with >= 5 purchases until nothing
changes; each user's purchases in time order; title = the metadata's ``title``; image = the first
``large`` URL of the metadata's ``images`` (else the first ``hi_res``, else the first ``thumb``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from array import array
from collections.abc import Iterator
from logging import getLogger
from pathlib import Path

import numpy as np
from tqdm import tqdm

from recbole_perpeft.data.importers import clean_title, write_atomic_files

logger = getLogger(__name__)

IMAGE_KEYS = ("large", "hi_res", "thumb")  # preference order of a metadata image's URLs
MIN_PURCHASES = 5

# The paper's Table 1 after preprocessing (only the numbers we are sure of).
PAPER_STATS = {"amazon-arts": {"users": 24_511, "items": 18_884}}


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
