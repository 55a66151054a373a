"""Small Amazon Reviews 2023 raw files (the real field names) and a local HTTP server to serve them.

Plain module: ``from tests.amazon_fixtures import AmazonRaw, FixtureServer, make_amazon_raw``.

Reviews lines: ``rating, title, text, images[{small_image_url, medium_image_url, large_image_url,
attachment_type}], asin, parent_asin, user_id, timestamp (ms), helpful_vote, verified_purchase``.
Metadata lines: ``main_category, title, average_rating, rating_number, features, description, price,
images[{thumb, large, variant, hi_res}], videos, store, categories, details, parent_asin,
bought_together``.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

CATEGORY = "Arts_Crafts_and_Sewing"
T0 = 1_600_000_000_000  # ms, as the raw timestamps


def jpeg_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (20, 16)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="JPEG")
    return out.getvalue()


def gzip_lines(records: list[dict]) -> bytes:
    return gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode())


def review(user: str, item: str, ts: int, rating: float = 5.0) -> dict:
    img = "https://images-na.ssl-images-amazon.com/images/I/review.jpg"
    return {
        "rating": rating,
        "title": "Great",
        "text": "Works well.\nWould buy again.",
        "images": [
            {"small_image_url": img, "medium_image_url": img, "large_image_url": img, "attachment_type": "IMAGE"}
        ],
        "asin": f"{item}-V{ts % 3}",  # a variant: the item is the parent_asin
        "parent_asin": item,
        "user_id": user,
        "timestamp": ts,
        "helpful_vote": 0,
        "verified_purchase": True,
    }


def meta(item: str, title: str | None, images: list[dict]) -> dict:
    return {
        "main_category": "Arts, Crafts & Sewing",
        "title": title,
        "average_rating": 4.5,
        "rating_number": 10,
        "features": [],
        "description": [],
        "price": None,
        "images": images,
        "videos": [],
        "store": "Store",
        "categories": [],
        "details": {},
        "parent_asin": item,
        "bought_together": None,
    }


def image_entry(thumb=None, large=None, hi_res=None, variant="MAIN") -> dict:
    return {"thumb": thumb, "large": large, "variant": variant, "hi_res": hi_res}


@dataclass
class AmazonRaw:
    """Generated raw files and what they should preprocess into."""

    reviews: bytes
    meta: bytes
    files: dict[str, bytes]  # served path -> body (raw files and images)
    sequences: dict[str, list[str]]  # core user -> items in time order
    image_url: dict[str, str | None]  # item -> the URL preprocessing must pick (path on the server)
    titles: dict[str, str]  # item -> expected (sanitised) title
    broken_image_item: str = ""
    missing_image_item: str = ""  # HTTP 404
    no_url_items: list[str] = field(default_factory=list)
    dropped_users: list[str] = field(default_factory=list)
    dropped_items: list[str] = field(default_factory=list)


def make_amazon_raw(n_users: int = 60, n_items: int = 24, seed: int = 0) -> AmazonRaw:
    """Core users ``U001..`` buy 7-9 distinct items ``P001..`` each (consecutive windows: every item
    gets well over 5 purchases), written to the file in shuffled order. Noise that 5-core removes:
    users with 3 purchases, an item bought by 3 users. A duplicated review line. Item images follow
    the selection rules' cases; one image is broken, one missing (404), some items have no URL."""
    rng = np.random.default_rng(seed)
    items = [f"P{i:03d}" for i in range(1, n_items + 1)]
    sequences, lines = {}, []
    for u in range(n_users):
        user = f"U{u + 1:03d}"
        start = (u * 5) % n_items
        seq = [items[(start + k) % n_items] for k in range(7 + u % 3)]
        rng.shuffle(seq)
        sequences[user] = seq
        base = T0 + int(rng.integers(0, 10**9))
        lines += [review(user, item, base + 60_000 * t + int(rng.integers(0, 1000))) for t, item in enumerate(seq)]
    dropped_users = [f"S{s}" for s in range(1, 4)]
    for s, user in enumerate(dropped_users):
        lines += [review(user, items[(s + k) % n_items], T0 + k) for k in range(3)]
    for u in range(3):
        lines.append(review(f"U{u + 1:03d}", "RARE1", T0 + 10**10 + u))  # 3 buyers: dropped, users keep >= 7
    order = rng.permutation(len(lines))
    lines = [lines[i] for i in order]
    lines.insert(5, dict(lines[2]))  # an exact duplicate line
    lines.insert(7, {"user_id": None, "parent_asin": "P001", "timestamp": T0})  # unusable line
    # The RARE1 purchases are the last in time of their users, so dropping them keeps the expected order.

    files: dict[str, bytes] = {}
    image_url: dict[str, str | None] = {}
    metas, titles = [], {}
    for i, item in enumerate(items):
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        good = f"/img/{i}-{'abcdef'[i % 6]}.jpg"  # names unrelated to the item ids
        files[good] = jpeg_bytes(colour)
        second = f"/img/{i}-second.jpg"
        files[second] = jpeg_bytes((255 - colour[0], 0, 0))
        title = f"Acrylic paint set {i} colours"
        if i % 6 == 1:  # first entry lacks 'large': the first large is the second entry's
            images = [image_entry(thumb="/x/t.jpg", hi_res="/x/h.jpg"), image_entry(thumb="/x/t2.jpg", large=second)]
            image_url[item] = second
        elif i % 6 == 2:  # no large anywhere: the first hi_res
            images = [image_entry(thumb="/x/t.jpg"), image_entry(thumb="/x/t2.jpg", hi_res=good)]
            image_url[item] = good
        elif i % 6 == 3:  # thumbs only: the first thumb
            images = [image_entry(thumb=good), image_entry(thumb=second)]
            image_url[item] = good
        else:  # large > hi_res > thumb within the first entry
            images = [image_entry(thumb="/x/t.jpg", large=good, hi_res="/x/h.jpg"), image_entry(large=second)]
            image_url[item] = good
        if i == 4:
            title = 'Brush\tset "Pro"\n12 pcs'  # a tab, a newline and quotes
            titles[item] = 'Brush set "Pro" 12 pcs'
        elif i == 5:
            title = ""
        titles.setdefault(item, title)
        metas.append(meta(item, title, images))
    no_image, broken, missing = items[6], items[7], items[8]
    metas[6]["images"] = []
    image_url[no_image] = None
    files[image_url[broken]] = b"<html>not an image</html>"
    del files[image_url[missing]]
    metas.append(meta(items[0], "A later duplicate metadata line", []))  # the first line of an item wins
    metas.append(meta("NOT-REVIEWED", "Never bought", [image_entry(large="/img/none.jpg")]))
    # The last item has no metadata line at all: empty title, no image URL.
    without_meta = items[-1]
    metas = [m for m in metas if m["parent_asin"] != without_meta]
    titles[without_meta] = ""
    image_url[without_meta] = None

    return AmazonRaw(
        reviews=gzip_lines(lines),
        meta=gzip_lines(metas),
        files=files,
        sequences=sequences,
        image_url=image_url,
        titles=titles,
        broken_image_item=broken,
        missing_image_item=missing,
        no_url_items=[no_image, without_meta],
        dropped_users=dropped_users,
        dropped_items=["RARE1"],
    )


def raw_paths(category: str = CATEGORY) -> tuple[str, str]:
    return (
        f"/amazon_2023/raw/review_categories/{category}.jsonl.gz",
        f"/amazon_2023/raw/meta_categories/meta_{category}.jsonl.gz",
    )


# --- the server ---------------------------------------------------------------------------------------


class FixtureServer:
    """``files`` (path -> bytes) over HTTP on 127.0.0.1 (ephemeral port), with Range requests
    (``bytes=N-``). ``cut_once``: paths whose first GET announces the full length but sends half,
    then closes (a dropped connection). ``requests`` logs (path, Range header). Use as a context
    manager; absolute image URLs in ``files`` are served by path."""

    def __init__(self, files: dict[str, bytes], cut_once: set[str] | None = None):
        self.files = dict(files)
        self.cut_once = set(cut_once or ())
        self.requests: list[tuple[str, str | None]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                rng = self.headers.get("Range")
                with server.lock:
                    server.requests.append((path, rng))
                    cut = path in server.cut_once
                    server.cut_once.discard(path)
                body = server.files.get(path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", rng or "")
                if match:
                    start = int(match.group(1))
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                rest = body[start:]
                self.send_header("Content-Length", str(len(rest)))
                self.end_headers()
                self.wfile.write(rest[: len(rest) // 2] if cut else rest)
                self.wfile.flush()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def paths_requested(self, prefix: str = "") -> list[str]:
        return [p for p, _ in self.requests if p.startswith(prefix)]

    def __enter__(self) -> FixtureServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def serve_amazon(raw: AmazonRaw, category: str = CATEGORY, cut_once: set[str] | None = None) -> FixtureServer:
    """A server for ``raw``: the two raw files at their release paths, images at their paths; the
    metadata's image paths are rewritten to absolute URLs of this server."""
    reviews_path, meta_path = raw_paths(category)
    server = FixtureServer({reviews_path: raw.reviews, **raw.files}, cut_once)
    records = [json.loads(line) for line in gzip.decompress(raw.meta).decode().splitlines()]
    for record in records:
        for image in record["images"]:
            for key in ("thumb", "large", "hi_res"):
                if image.get(key):
                    image[key] = server.url(image[key])
    server.files[meta_path] = gzip_lines(records)
    return server
