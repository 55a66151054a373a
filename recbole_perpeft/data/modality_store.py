"""Every item's title tokens and image pixels, decoded once and cached on disk.

Indexed by RecBole's internal item id (row 0 is the padding item). Nothing here is decoded inside
the training loop: the model gathers rows of these tensors. Missing titles and images are recorded
in ``has_text`` / ``has_image`` masks (the model substitutes a learned placeholder); a corrupt image
file, or one too large to decode, is logged by path and counted as missing.

Cache keys cover what the values depend on: the dataset's items, the titles themselves, and for images
each file's path, size and modification time (a missing file too: an image that appears later, or is
replaced, invalidates the entry) plus the decoding (:data:`IMAGE_DECODING`). ``modality_source`` gives
that key part to the other caches built from these inputs (frozen features, layer states). Writes are
atomic and locked per entry (:mod:`recbole_perpeft.data.cache_files`): runs sharing a ``cache_dir``
build each entry once and never read half a file.

``missing_image_ratio`` (beyond the paper, its limitation D.3.3) withholds a seeded share of the items'
images (:meth:`ItemModalityStore.withhold_images`): those items are treated exactly as items without an
image file (``has_image`` False, so every adapter family gives them the learned placeholder). The item tower
withholds after its caches are built, so the pixel, frozen-feature and layer-state caches serve every
ratio; a cache built from a withheld ``has_image`` would encode fewer items, so
:meth:`ItemModalityStore.modality_source` keys such a cache by the withheld items."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from logging import getLogger

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from recbole_perpeft.data.cache_files import atomic_output, build_lock, preallocate, set_lock_timeout
from recbole_perpeft.data.image_decoding import (  # noqa: F401 - load_image and the rest re-exported
    DRAFT_GAP,
    IMAGE_DECODING,
    MAX_ASPECT_RATIO,
    UnusableImage,
    load_image,
    resize_and_crop,
)


def cache_key(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def gather_rows(array: np.ndarray, items: torch.Tensor) -> torch.Tensor:
    """Rows ``items`` (any shape, flattened) of a memory-mapped array, in the items' order: each
    distinct row is read once, in ascending order (what a memmap reads fastest), then un-permuted."""
    flat = items.reshape(-1).cpu().numpy()
    rows = np.unique(flat)
    block = torch.from_numpy(np.ascontiguousarray(array[rows]))
    return block[torch.from_numpy(np.searchsorted(rows, flat))]


def file_stamp(path: str | None) -> list | None:
    """What a cache of a file's content is keyed on: [path, size, mtime in ns]; [path, None] when it is
    missing (or not a regular file), None for no path. One os.stat."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return [path, None]
    if not stat.S_ISREG(st.st_mode):
        return [path, None]
    return [path, st.st_size, st.st_mtime_ns]


def withheld_image_items(has_image: torch.Tensor, ratio: float, seed: int) -> torch.Tensor:
    """[n_items] bool: ``round(ratio * n)`` of the n items with ``has_image``, chosen by the seed (round
    half up). Every item id gets a seeded random key and the present items with the smallest keys are
    withheld: a larger ratio with the same seed withholds a superset, and an image added to or removed
    from the dataset changes the choice of no other item."""
    has_image = torch.as_tensor(has_image, dtype=torch.bool).cpu()
    present = np.flatnonzero(has_image.numpy())
    count = int(np.floor(ratio * len(present) + 0.5))
    keys = np.random.default_rng(seed).random(len(has_image))
    chosen = present[np.argsort(keys[present], kind="stable")[:count]]
    withheld = torch.zeros(len(has_image), dtype=torch.bool)
    withheld[torch.from_numpy(chosen)] = True
    return withheld


def missing_image_settings(config) -> tuple[float, int]:
    """``missing_image_ratio`` (a number in [0, 1]) and the seed (``missing_image_seed``, ~: ``seed``)."""
    def get(key):
        return config[key] if key in config else None

    ratio = get("missing_image_ratio")
    ratio = 0.0 if ratio is None else ratio
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"missing_image_ratio must be a number between 0 (keep every image) and 1 (withhold "
                         f"them all), got {ratio!r}.")
    seed = get("missing_image_seed")
    seed = get("seed") if seed is None else seed
    seed = 0 if seed is None else seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"missing_image_seed must be an integer (or ~ for the run's seed), got {seed!r}.")
    return float(ratio), seed


class ItemModalityStore:
    missing_image_ratio = 0.0
    missing_image_seed = 0
    withheld_images: torch.Tensor | None = None  # [n_items] bool, once withhold_images withheld some

    def __init__(self, config, dataset):
        self.logger = getLogger()
        self.dataset_name = config["dataset"]
        self.cache_dir = os.path.join(config["cache_dir"] or "cache", self.dataset_name)
        self.show_progress = bool(config["show_progress"])
        set_lock_timeout(config["cache_lock_timeout"] if "cache_lock_timeout" in config else 3600)
        self.item_tokens = list(dataset.field2id_token[dataset.iid_field])
        self.texts = dataset.item_texts()
        self.image_paths = dataset.item_image_paths()
        self.n_items = len(self.item_tokens)
        self.has_text = torch.tensor([bool(t) for t in self.texts])
        self.has_text[0] = False
        missing = self.n_items - 1 - int(self.has_text.sum())
        if missing == self.n_items - 1:
            self._check_some_modality_left(config)
        if missing:
            self.logger.warning(f"{missing} of {self.n_items - 1} items have no text: they get a learned placeholder.")
        self.missing_image_ratio, self.missing_image_seed = missing_image_settings(config)
        if self.missing_image_ratio > 0:
            self._check_images_to_withhold(config["modalities"] if "modalities" in config else None)

    def _check_some_modality_left(self, config) -> None:
        """No item has a title: refuse here, before any model is built, when no item has an image either
        (or the run uses none); the model would train on placeholders alone (or crash on an empty batch)."""
        modalities = config["modalities"] if "modalities" in config else None
        images_used = modalities is None or "image" in modalities
        if images_used and self.image_availability().any():
            return
        field = config["text_field"]
        titles = (f"text_field '{field}' of {self.dataset_name}.item is empty for every item" if field
                  else "text_field is not set")  # fmt: skip
        if not images_used:
            images = f"the run uses no images (modalities: {list(modalities)})"
        elif config["image_field"]:
            images = f"no item's image_field '{config['image_field']}' names an existing file"
        else:
            images = f"no item has an image file in image_dir={config['image_dir']}"
        raise ValueError(
            f"No modality left: {titles}, and {images}. Give the items titles (text_field) or images "
            "(image_dir / image_field)."
        )

    def _check_images_to_withhold(self, modalities) -> None:
        """An error, not a warning: a run meant to measure robustness to missing images would otherwise
        report the numbers of a run with no images withheld, under the ratio's name."""
        ratio = self.missing_image_ratio
        if modalities is not None and "image" not in modalities:
            raise ValueError(f"missing_image_ratio={ratio} withholds item images, but this run uses none (modalities: "
                             f"{list(modalities)}). Set missing_image_ratio: 0, or add image to modalities.")
        if not self.image_availability().any():
            raise ValueError(
                f"missing_image_ratio={ratio} withholds item images, but no item of {self.dataset_name} has an image "
                "file (a text-only dataset, or image_dir / image_field point nowhere): there is nothing to withhold. "
                "Set missing_image_ratio: 0, or give the items images."
            )

    def _cache_file(self, kind: str, *parts) -> str:
        os.makedirs(self.cache_dir, exist_ok=True)
        return os.path.join(self.cache_dir, f"{kind}-{cache_key(self.item_tokens, *parts)}")

    def image_stamps(self) -> list:
        """:func:`file_stamp` of every item's image, taken once per store (per ``image_paths`` list)."""
        cached = self.__dict__.get("_image_stamps")
        if cached is None or cached[0] is not self.image_paths:
            cached = (self.image_paths, [file_stamp(p) for p in self.image_paths])
            self._image_stamps = cached
        return cached[1]

    def modality_source(self, modality: str):
        """The cache-key part for what a modality's values are computed from: the titles, or every image
        file's path, size and mtime (missing ones included) and how it is decoded."""
        if modality == "text":
            return self.texts
        source = self._image_files_source()
        if self.withheld_images is not None and bool(self.withheld_images.any()):
            # What is built from has_image from here on encodes only the items that keep their image.
            source["withheld"] = torch.nonzero(self.withheld_images).flatten().tolist()
        return source

    def _image_files_source(self) -> dict:
        return {"files": self.image_stamps(), "decoding": IMAGE_DECODING}

    # --- text ----------------------------------------------------------------------------------------

    def text_tokens(self, tokenizer, max_length: int, tokenizer_id: str) -> dict:
        """``input_ids`` / ``attention_mask`` [n_items, max_length] (int32), cached."""
        path = self._cache_file("tokens", self.modality_source("text"), tokenizer_id, max_length) + ".pt"
        if not os.path.isfile(path):
            with build_lock(path, [path], "the title tokens"):
                if not os.path.isfile(path):  # another process may have written it while we waited
                    encoded = tokenizer(
                        self.texts, max_length=max_length, truncation=True, padding="max_length", return_tensors="pt"
                    )
                    tokens = {k: encoded[k].to(torch.int32) for k in ("input_ids", "attention_mask")}
                    with atomic_output(path) as tmp:
                        torch.save(tokens, tmp)
                    return tokens
        return torch.load(path, weights_only=True)

    # --- images --------------------------------------------------------------------------------------

    def image_availability(self) -> torch.Tensor:
        """Which items have an image file (existence only; decoding may still find it corrupt)."""
        return torch.tensor([stamp is not None and stamp[1] is not None for stamp in self.image_stamps()])

    def image_pixels(self, size: int) -> tuple[np.ndarray, torch.Tensor]:
        """uint8 pixels [n_items, 3, size, size] (memory-mapped from the cache) and ``has_image``, every
        decodable image included: :meth:`withhold_images` applies ``missing_image_ratio`` (the item tower
        calls it after its caches are built, so that every ratio shares them)."""
        base = self._cache_file("pixels", self._image_files_source(), size)
        pixels_file, mask_file = base + ".npy", base + "-mask.npy"

        def complete() -> bool:  # the pixels are renamed into place after the mask
            return os.path.isfile(pixels_file) and os.path.isfile(mask_file)

        if not complete():
            with build_lock(base, [pixels_file, mask_file], "the decoded item images"):
                if not complete():  # another process may have decoded them while we waited
                    self._decode_images(size, pixels_file, mask_file)
        has_image = torch.from_numpy(np.load(mask_file))
        return np.load(pixels_file, mmap_mode="r"), has_image

    def withhold_images(self, has_image: torch.Tensor) -> torch.Tensor:
        """``has_image`` without the images ``missing_image_ratio`` withholds (a new tensor; unchanged at
        ratio 0); records them in ``withheld_images`` and logs how many."""
        if self.missing_image_ratio == 0:
            return has_image
        if not bool(has_image.any()):
            raise ValueError(f"missing_image_ratio={self.missing_image_ratio}: no item of {self.dataset_name} has a "
                             "usable image (all missing or corrupt), so there is nothing to withhold. Set "
                             "missing_image_ratio: 0, or fix the images.")
        withheld = withheld_image_items(has_image, self.missing_image_ratio, self.missing_image_seed)
        self.withheld_images = withheld
        self.logger.info(
            f"missing_image_ratio {self.missing_image_ratio} (seed {self.missing_image_seed}): withheld the images "
            f"of {int(withheld.sum())} of the {int(has_image.sum())} items that have one; they get the learned "
            "placeholder, as items without an image file."
        )
        return has_image & ~withheld

    def _decode_images(self, size: int, pixels_file: str, mask_file: str) -> None:
        has_image = np.zeros(self.n_items, dtype=bool)
        absent, corrupt, too_large, odd = 0, [], [], []
        stamps = self.image_stamps()
        with atomic_output(pixels_file) as tmp:
            pixels = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(self.n_items, 3, size, size))
            preallocate(tmp)  # a full disk is one error line here, not a SIGBUS halfway through the decoding
            items = tqdm(range(1, self.n_items), desc="Decoding item images", disable=not self.show_progress)
            for item in items:
                path = self.image_paths[item]
                if stamps[item] is None or stamps[item][1] is None:
                    absent += 1
                    continue
                token = self.item_tokens[item]
                try:
                    pixels[item] = load_image(path, size)
                    has_image[item] = True
                except (Image.DecompressionBombError, MemoryError) as err:
                    too_large.append(path)
                    self.logger.warning(
                        f"Image {path} is too large to decode ({err}): item {token} has no image. Shrink the "
                        "file (a few hundred pixels a side is plenty) or raise PIL.Image.MAX_IMAGE_PIXELS; the "
                        "next run decodes the changed file."
                    )
                except UnusableImage as err:
                    odd.append(path)
                    self.logger.warning(f"Image {path} is not used ({err}): item {token} has no image.")
                except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as err:
                    corrupt.append(path)
                    self.logger.warning(f"Corrupt image {path} ({err}): item {token} has no image.")
            pixels.flush()
            del pixels
            with atomic_output(mask_file) as mask_tmp, open(mask_tmp, "wb") as f:
                np.save(f, has_image)  # before the pixels: their presence marks a complete entry
        self.logger.info(
            f"Images: {int(has_image.sum())} decoded, {absent} items without an image file, "
            f"{len(corrupt)} corrupt, {len(too_large)} too large, {len(odd)} out of shape; missing ones get a "
            "learned placeholder."
        )
