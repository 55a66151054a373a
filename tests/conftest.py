"""Shared fixtures: small generated RecBole atomic datasets and configs whose outputs stay in tmp_path."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

# No test may reach the network (transformers / huggingface_hub read these once, at import).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_configure(config):
    # RecBole 1.2.1's own deprecation noise under pandas 2.x (the pandas<3 pin exists because of it).
    config.addinivalue_line("filterwarnings", "ignore:.*inplace method:FutureWarning:recbole")
    config.addinivalue_line("filterwarnings", "ignore:using <built-in function len> in Series.agg:FutureWarning")


@dataclass
class AtomicDataset:
    """What :func:`build_atomic_dataset` wrote, so tests can compare against the source of truth."""

    root: Path  # RecBole's data_path (the folder holding <name>/)
    name: str
    sequences: dict[str, list[str]]  # user token -> item tokens in time order
    titles: dict[str, str]  # item token -> title ('' = empty)
    prices: dict[str, float | None]  # item token -> price (None = missing value)
    image_files: dict[str, str] = field(default_factory=dict)  # item token -> relative path ('' = none)
    colours: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # item token -> solid RGB of its JPEG
    no_image_item: str | None = None
    corrupt_image_item: str | None = None
    empty_title_item: str | None = None
    unused_item: str | None = None  # listed in .item, never interacted with

    @property
    def folder(self) -> Path:
        return self.root / self.name

    @property
    def image_dir(self) -> Path:
        return self.folder / "images"


def build_atomic_dataset(
    root: Path,
    name: str = "toyrec",
    n_users: int = 30,
    n_items: int = 25,
    min_len: int = 8,
    max_len: int = 12,
    seed: int = 0,
    images: bool = True,
    image_size: tuple[int, int] = (24, 18),
    sparse_users: int = 0,
    rare_items: int = 0,
) -> AtomicDataset:
    """Write ``root/name/name.inter`` and ``name.item`` (+ JPEGs in ``name/images``).

    Core users ``u1..`` have ``min_len..max_len`` distinct items each, spread evenly over items ``1..n_items``
    so every core item keeps well over 5 interactions. ``sparse_users`` extra users have only 3 interactions
    and ``rare_items`` extra items are used by only 2 users: both disappear under 5-core filtering. Item
    ``n_items + rare_items + 1`` is listed in .item but never interacted with. Item 3 has an empty title,
    item 5 no image file, item 7 a corrupt .jpg; item 2 has a missing price.
    """
    rng = np.random.default_rng(seed)
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    items = [str(i) for i in range(1, n_items + 1)]
    rare = [str(n_items + k) for k in range(1, rare_items + 1)]
    unused = str(n_items + rare_items + 1)

    sequences: dict[str, list[str]] = {}
    cursor = 0
    for u in range(1, n_users + 1):
        length = min_len + (u - 1) % (max_len - min_len + 1)
        chosen = [items[(cursor + k) % n_items] for k in range(length)]
        cursor += length
        rng.shuffle(chosen)
        sequences[f"u{u}"] = chosen
    for k, item in enumerate(rare):
        for u in (1 + 2 * k, 2 + 2 * k):
            sequences[f"u{u}"].append(item)
    for s in range(1, sparse_users + 1):
        sequences[f"s{s}"] = [items[(s + k) % n_items] for k in range(3)]

    with open(folder / f"{name}.inter", "w") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for u_index, (user, seq) in enumerate(sequences.items()):
            for t, item in enumerate(seq):
                f.write(f"{user}\t{item}\t{1_000_000 + 1000 * u_index + 10 * t}\n")

    all_items = items + rare + [unused]
    titles = {item: f"movie {item} part {int(item) % 4}" for item in all_items}
    titles["3"] = ""
    prices: dict[str, float | None] = {item: float(int(item)) for item in all_items}
    prices["2"] = None
    image_files = {item: f"images/{item}.jpg" for item in all_items}
    image_files["5"] = ""
    with open(folder / f"{name}.item", "w") as f:
        f.write("item_id:token\ttitle:token_seq\tprice:float\timage:token\n")
        for item in all_items:
            price = "" if prices[item] is None else f"{prices[item]}"
            f.write(f"{item}\t{titles[item]}\t{price}\t{image_files[item]}\n")

    colours: dict[str, tuple[int, int, int]] = {}
    if images:
        from PIL import Image

        (folder / "images").mkdir(exist_ok=True)
        for item in all_items:
            if item == "5":
                continue
            path = folder / "images" / f"{item}.jpg"
            if item == "7":
                path.write_bytes(b"this is not a jpeg at all" * 4)
                continue
            colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
            colours[item] = colour
            Image.new("RGB", image_size, colour).save(path, format="JPEG")

    return AtomicDataset(
        root=root,
        name=name,
        sequences=sequences,
        titles=titles,
        prices=prices,
        image_files=image_files,
        colours=colours,
        no_image_item="5",
        corrupt_image_item="7",
        empty_title_item="3",
        unused_item=unused,
    )


def config_for(model: str, data: AtomicDataset, base: dict, **overrides):
    """A :class:`recbole_perpeft.config.Config` for ``model`` on a generated dataset (``overrides`` win)."""
    from recbole_perpeft.config import Config

    config_dict = {
        **base,
        "data_path": str(data.root),
        "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title", "price", "image"]},
        "text_field": "title",
        **overrides,
    }
    return Config(model=model, dataset=data.name, config_dict=config_dict)


@pytest.fixture
def base_config(tmp_path) -> dict:
    """Config keys that keep every output of a run inside tmp_path, quiet, on CPU and sized for tiny data."""
    return {
        "checkpoint_dir": str(tmp_path / "saved"),
        "cache_dir": str(tmp_path / "cache"),
        "show_progress": False,
        "device": "cpu",
        "use_gpu": False,
        "state": "WARNING",
        "reproducibility": True,
        "topk": [5],
        "valid_metric": "hit@5",
    }


@pytest.fixture
def build_toy_dataset(tmp_path):
    """Factory: ``build_toy_dataset(name=..., **kwargs)`` writes a dataset under ``tmp_path/data``."""

    def make(**kwargs) -> AtomicDataset:
        return build_atomic_dataset(tmp_path / "data", **kwargs)

    return make


@pytest.fixture
def toy_dataset(build_toy_dataset) -> AtomicDataset:
    """The default generated dataset (30 users x 8-12 items over 25 items, with images)."""
    return build_toy_dataset()


@pytest.fixture
def toy_config(base_config):
    """Factory: ``toy_config(model, data, **overrides)`` -> Config with outputs under tmp_path."""

    def make(model: str, data: AtomicDataset, **overrides):
        return config_for(model, data, base_config, **overrides)

    return make


@pytest.fixture
def in_tmp_path(tmp_path, monkeypatch):
    """Run in tmp_path: RecBole's Trainer writes log_tensorboard/ relative to the working directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
