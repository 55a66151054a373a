"""Make a dataset's atomic files exist: the Amazon 2023 pipeline, or an import of another layout.

On first use ``recbole_perpeft.data.create_dataset`` calls :func:`ensure_atomic_files` (a dataset whose
YAML names an ``amazon_category`` is downloaded and preprocessed; one with a ``raw_layout`` is imported
from ``raw_dir``); building a ``Config`` alone never does. The same runs alone from the command line::

    recbole-perpeft prepare --dataset=amazon-arts [--raw_dir=DIR] [--data_path=dataset/]
        [--download=false] [--images=true|false] [--force]
    recbole-perpeft prepare --dataset=NAME --layout=perpeft|iisan --source=DIR

Amazon datasets are ready only when ``NAME.inter`` exists, and it is renamed into place last (from
``NAME.inter.staged``, after the images): an interrupted preparation is resumed by the next run,
reusing the preprocessed files when the manifest matches the settings and skipping images on disk.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from recbole_perpeft.config_values import choice
from recbole_perpeft.data.amazon import preprocess, read_image_urls
from recbole_perpeft.data.amazon_download import DEFAULT_BASE_URLS, DatasetUnavailableError, fetch_raw_files
from recbole_perpeft.data.images import download_images
from recbole_perpeft.data.importers import LAYOUTS, has_layout, import_layout, layout_files
from recbole_perpeft.property_files import PROPERTIES_DIR

logger = logging.getLogger(__name__)


@dataclass
class PrepareOptions:
    dataset: str
    folder: Path  # <data_path>/<dataset>: where the atomic files go
    raw_dir: Path  # the raw files (Amazon) or the layout to import
    image_dir: Path
    layout: str | None  # "amazon" | "perpeft" | "iisan" | None (nothing we can prepare)
    category: str | None = None
    base_urls: tuple[str, ...] = DEFAULT_BASE_URLS
    download: bool = True
    images: bool = True
    ratio: float = 1.0
    seed: int = 2024
    image_workers: int = 8
    show_progress: bool = True
    force: bool = False

    @property
    def inter_file(self) -> Path:
        return self.folder / f"{self.dataset}.inter"


def options_from_config(config: Mapping, folder: Path) -> PrepareOptions:
    """Options from config keys (a RecBole Config's final dict, or the CLI's merged YAML)."""

    def get(key, default=None):
        value = config.get(key)
        return default if value is None else value

    category, layout = get("amazon_category"), get("raw_layout")
    if layout is not None:
        choice(layout, LAYOUTS, "raw_layout")
    ratio = float(get("raw_user_sample_ratio", 1.0))
    if not 0 < ratio <= 1:
        raise ValueError(f"raw_user_sample_ratio must be a number in (0, 1], got {ratio!r}.")
    base_urls = get("amazon_base_urls", DEFAULT_BASE_URLS)
    return PrepareOptions(
        dataset=str(config["dataset"]),
        folder=folder,
        raw_dir=Path(os.path.expanduser(str(get("raw_dir", folder / "raw")))),
        image_dir=Path(os.path.expanduser(str(get("image_dir", folder / "images")))),
        layout="amazon" if category else layout,
        category=category,
        base_urls=tuple([base_urls] if isinstance(base_urls, str) else base_urls),
        download=parse_bool(get("download", True)),
        images=parse_bool(get("download_images", True)),
        ratio=ratio,
        seed=int(get("seed", 2024)),
        image_workers=int(get("image_download_workers", 8)),
        show_progress=parse_bool(get("show_progress", True)),
    )


def parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "y", "on"):
        return True
    if text in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(f"Expected true or false, got {value!r}.")


# --- the two kinds of preparation ---------------------------------------------------------------------


def _manifest_matches(o: PrepareOptions) -> bool:
    """Whether the staged preprocessing was made with these settings (then it is reused)."""
    try:
        manifest = json.loads((o.folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    made_with = (manifest.get("dataset"), manifest.get("raw_user_sample_ratio"), manifest.get("seed"))
    return made_with == (o.dataset, o.ratio, o.seed)


def _item_tokens(item_file: Path) -> list[str]:
    with open(item_file, encoding="utf-8") as f:
        next(f, None)
        return [line.split("\t", 1)[0] for line in f if line.strip()]


def prepare_amazon(o: PrepareOptions) -> None:
    staged = o.folder / f"{o.dataset}.inter.staged"
    if o.force or not o.inter_file.is_file():
        if o.force or not (staged.is_file() and _manifest_matches(o)):
            reviews, meta = fetch_raw_files(
                o.dataset, o.category, o.raw_dir, o.folder.parent, o.base_urls, o.download, o.show_progress
            )
            preprocess(reviews, meta, o.folder, o.dataset, o.ratio, o.seed, staged, o.show_progress)
        else:
            logger.info(f"Reusing the preprocessed {staged} (manifest matches); resuming the images.")
    if o.images:
        urls = read_image_urls(o.folder / "image_urls.tsv") if (o.folder / "image_urls.tsv").is_file() else {}
        items = {item: urls.get(item) for item in _item_tokens(o.folder / f"{o.dataset}.item")}
        download_images(
            items, o.image_dir, o.folder / "image_report.json", workers=o.image_workers, show_progress=o.show_progress
        )
    if staged.is_file():
        os.replace(staged, o.inter_file)
    logger.info(f"{o.dataset} is ready in {o.folder}.")


def prepare_import(o: PrepareOptions) -> None:
    if not has_layout(o.raw_dir, o.layout):
        expected = ", ".join(layout_files(o.layout))
        raise DatasetUnavailableError(
            f"Dataset '{o.dataset}': no {o.layout} layout in {o.raw_dir} (expected {expected}). "
            f"Put those files in {o.raw_dir} or pass --raw_dir=DIR (the folder holding them), or import by hand:\n"
            f"    recbole-perpeft prepare --dataset={o.dataset} --layout={o.layout} "
            f"--source=DIR --data_path={o.folder.parent}"
        )
    import_layout(o.layout, o.raw_dir, o.folder, o.dataset, o.image_dir)


def prepare(o: PrepareOptions) -> None:
    if o.layout == "amazon":
        prepare_amazon(o)
    elif o.layout in LAYOUTS:
        prepare_import(o)
    else:
        raise ValueError(f"Dataset '{o.dataset}' has no amazon_category or raw_layout: nothing to prepare.")


@contextlib.contextmanager
def _visible_logs() -> Iterator[None]:
    """Without RecBole's logging set up (create_dataset called from a notebook or a script, not through
    quick_start.run): show our progress messages on stderr meanwhile."""
    root = logging.getLogger()
    if root.handlers:
        yield
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    package = logging.getLogger("recbole_perpeft.data")
    package.addHandler(handler)
    level, package.level = package.level, logging.INFO
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(level)


def ensure_atomic_files(config: Mapping) -> bool:
    """Prepare a known dataset whose ``.inter`` is missing; whether it exists now.

    ``config``: a RecBole Config's final dict, where ``data_path`` is already the dataset's folder.
    Unknown datasets (no ``amazon_category`` / ``raw_layout``) return False and are left to the
    caller's error. A known one that cannot be prepared raises :class:`DatasetUnavailableError`."""
    options = options_from_config(config, Path(config["data_path"]))
    if options.layout is None:
        return False
    with _visible_logs():
        prepare(options)
    return options.inter_file.is_file()


# --- command line --------------------------------------------------------------------------------------


def _yaml_settings(dataset: str) -> dict:
    """recbole_perpeft/properties/overall.yaml + properties/dataset/<dataset>.yaml: the keys a run would see."""
    import yaml

    settings: dict = {}
    for path in (PROPERTIES_DIR / "overall.yaml", PROPERTIES_DIR / "dataset" / f"{dataset}.yaml"):
        if path.is_file():
            settings.update(yaml.safe_load(path.read_text()) or {})
    return settings


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="recbole-perpeft prepare",
        description="Download and preprocess an Amazon Reviews 2023 dataset, or import another layout, "
        "into RecBole atomic files (<data_path>/<dataset>/).",
    )
    parser.add_argument("--dataset", required=True, help="e.g. amazon-arts, amazon-scientific, or a new name")
    parser.add_argument("--data_path", default="dataset/", help="folder holding <dataset>/ (default dataset/)")
    parser.add_argument(
        "--raw_dir",
        "--source",
        dest="raw_dir",
        default=None,
        help="raw files / the layout to import (default <data_path>/<dataset>/raw)",
    )
    parser.add_argument("--layout", choices=LAYOUTS, default=None, help="import this layout from --source")
    parser.add_argument("--download", default=None, help="true|false: fetch missing raw files")
    parser.add_argument("--images", default=None, help="true|false: download item images (Amazon)")
    parser.add_argument("--image_dir", default=None, help="default <data_path>/<dataset>/images")
    parser.add_argument("--raw_user_sample_ratio", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--base_url", action="append", default=None, help="a mirror (repeatable)")
    parser.add_argument("--force", action="store_true", help="redo the preprocessing / import")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = {**_yaml_settings(args.dataset), "dataset": args.dataset}
    overrides = {
        "raw_dir": args.raw_dir,
        "raw_layout": args.layout,
        "download": args.download,
        "download_images": args.images,
        "image_dir": args.image_dir,
        "seed": args.seed,
        "raw_user_sample_ratio": args.raw_user_sample_ratio,
        "amazon_base_urls": args.base_url,
    }
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if args.layout:
        settings["amazon_category"] = None  # an explicit import wins over the dataset's own pipeline
    try:
        options = options_from_config(settings, Path(args.data_path) / args.dataset)
        options.force = args.force
        if options.layout is None:
            raise ValueError(
                f"Don't know how to prepare '{args.dataset}': it has no "
                f"recbole_perpeft/properties/dataset/{args.dataset}.yaml with amazon_category or raw_layout; "
                f"to import files pass --layout={{{','.join(LAYOUTS)}}} --source=DIR."
            )
        if options.layout != "amazon" and options.inter_file.is_file() and not args.force:
            logger.info(f"{options.inter_file} exists; nothing to do (--force to import again).")
            return 0
        prepare(options)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from recbole_perpeft.cli_common import deprecated_alias

    deprecated_alias("python -m recbole_perpeft.data.prepare", "recbole-perpeft prepare")
    sys.exit(main())
