"""Every item's title tokens and image pixels, decoded once and cached on disk.

Indexed by RecBole's internal item id (row 0 is the padding item). Nothing here is decoded inside
the training loop: the model gathers rows of these tensors. Missing titles and images are recorded
in ``has_text`` / ``has_image`` masks (the model substitutes a learned placeholder); a corrupt image
file is logged by path and counted as missing."""

from __future__ import annotations

import hashlib
import json
import os
from logging import getLogger

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm


def cache_key(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def gather_rows(array: np.ndarray, items: torch.Tensor) -> torch.Tensor:
    """Rows ``items`` (any shape, flattened) of a memory-mapped array, in the items' order: each
    distinct row is read once, in ascending order (what a memmap reads fastest), then un-permuted."""
    flat = items.reshape(-1).cpu().numpy()
    rows = np.unique(flat)
    block = torch.from_numpy(np.ascontiguousarray(array[rows]))
    return block[torch.from_numpy(np.searchsorted(rows, flat))]


def load_image(path: str, size: int) -> np.ndarray:
    """RGB, shorter side resized to ``size`` (bicubic), centre-cropped: uint8 [3, size, size]."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


class ItemModalityStore:
    def __init__(self, config, dataset):
        self.logger = getLogger()
        self.dataset_name = config["dataset"]
        self.cache_dir = os.path.join(config["cache_dir"] or "cache", self.dataset_name)
        self.show_progress = bool(config["show_progress"])
        self.item_tokens = list(dataset.field2id_token[dataset.iid_field])
        self.texts = dataset.item_texts()
        self.image_paths = dataset.item_image_paths()
        self.n_items = len(self.item_tokens)
        self.has_text = torch.tensor([bool(t) for t in self.texts])
        self.has_text[0] = False
        missing = self.n_items - 1 - int(self.has_text.sum())
        if missing:
            self.logger.warning(f"{missing} of {self.n_items - 1} items have no text: they get a learned placeholder.")

    def _cache_file(self, kind: str, *parts) -> str:
        os.makedirs(self.cache_dir, exist_ok=True)
        return os.path.join(self.cache_dir, f"{kind}-{cache_key(self.item_tokens, *parts)}")

    # --- text ----------------------------------------------------------------------------------------

    def text_tokens(self, tokenizer, max_length: int, tokenizer_id: str) -> dict:
        """``input_ids`` / ``attention_mask`` [n_items, max_length] (int32), cached."""
        path = self._cache_file("tokens", self.texts, tokenizer_id, max_length) + ".pt"
        if os.path.isfile(path):
            return torch.load(path, weights_only=True)
        encoded = tokenizer(
            self.texts, max_length=max_length, truncation=True, padding="max_length", return_tensors="pt"
        )
        tokens = {k: encoded[k].to(torch.int32) for k in ("input_ids", "attention_mask")}
        torch.save(tokens, path + ".tmp")
        os.replace(path + ".tmp", path)
        return tokens

    # --- images --------------------------------------------------------------------------------------

    def image_availability(self) -> torch.Tensor:
        """Which items have an image file (existence only; decoding may still find it corrupt)."""
        return torch.tensor([p is not None and os.path.isfile(p) for p in self.image_paths])

    def image_pixels(self, size: int) -> tuple[np.ndarray, torch.Tensor]:
        """uint8 pixels [n_items, 3, size, size] (memory-mapped from the cache) and ``has_image``."""
        base = self._cache_file("pixels", self.image_paths, size, "resize-shorter-bicubic-centercrop")
        pixels_file, mask_file = base + ".npy", base + "-mask.npy"
        if not (os.path.isfile(pixels_file) and os.path.isfile(mask_file)):
            self._decode_images(size, pixels_file, mask_file)
        return np.load(pixels_file, mmap_mode="r"), torch.from_numpy(np.load(mask_file))

    def _decode_images(self, size: int, pixels_file: str, mask_file: str) -> None:
        tmp = pixels_file + ".tmp.npy"
        pixels = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(self.n_items, 3, size, size))
        has_image = np.zeros(self.n_items, dtype=bool)
        absent, corrupt = 0, []
        items = tqdm(range(1, self.n_items), desc="Decoding item images", disable=not self.show_progress)
        for item in items:
            path = self.image_paths[item]
            if path is None or not os.path.isfile(path):
                absent += 1
                continue
            try:
                pixels[item] = load_image(path, size)
                has_image[item] = True
            except (UnidentifiedImageError, OSError, ValueError) as err:
                corrupt.append(path)
                self.logger.warning(f"Corrupt image {path} ({err}): item {self.item_tokens[item]} has no image.")
        pixels.flush()
        del pixels
        np.save(mask_file, has_image)
        os.replace(tmp, pixels_file)
        self.logger.info(
            f"Images: {int(has_image.sum())} decoded, {absent} items without an image file, "
            f"{len(corrupt)} corrupt; missing ones get a learned placeholder."
        )
