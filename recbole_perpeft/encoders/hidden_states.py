"""Per-layer summary vectors of a frozen encoder for every item, computed once and memory-mapped
from an fp16 .npy cache: what side networks (IISAN, CROSSAN) read instead of running the
foundation model during training.

One file per (dataset items, modality source, encoder + preprocessing, layers): [n_items, sum(widths)]
float16, the selected layers' summaries side by side; rows of items without the modality (and row 0,
the padding item) are zeros. A JSON sidecar records the layers and widths. The build records its
progress after every batch, so an interrupted one (Ctrl-C, a crash) resumes where it stopped.

Image entries are keyed on every image file's path, size and mtime (``store.modality_source``): a
replaced or added image rebuilds them. The build holds the entry's lock
(:func:`recbole_perpeft.data.cache_files.build_lock`): a second run on the same ``cache_dir`` waits,
then memory-maps the first one's file (or resumes its partial build if that run died)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from logging import getLogger

import numpy as np
import torch
from tqdm import tqdm

from recbole_perpeft.data.cache_files import build_lock, temp_path, write_json_atomic
from recbole_perpeft.data.modality_store import gather_rows
from recbole_perpeft.encoders.base import FoundationModel, select_layers

__all__ = ["LayerStates", "load_layer_states", "select_layers", "layer_states_path"]

FP16_MAX = float(np.finfo(np.float16).max)


class LayerStates:
    """Memory-mapped per-layer summaries of every item: ``gather(items)`` -> one float32 tensor per layer."""

    def __init__(self, array: np.ndarray, layers: list[int], widths: list[int], path: str | None = None):
        if array.ndim != 2 or array.shape[1] != sum(widths) or len(layers) != len(widths):
            raise ValueError(f"Layer states of shape {array.shape} do not match layers {layers} with widths {widths}.")
        self.array = array
        self.layers = list(layers)
        self.widths = list(widths)
        self.path = path

    @property
    def n_items(self) -> int:
        return int(self.array.shape[0])

    def gather(self, items: torch.Tensor) -> list[torch.Tensor]:
        """Rows of ``items`` (any shape): one float32 [*items.shape, width] tensor per layer, on the
        items' device."""
        block = gather_rows(self.array, items).float().to(items.device)
        return [
            part.reshape(*items.shape, width)
            for part, width in zip(block.split(self.widths, dim=1), self.widths, strict=True)
        ]


def layer_states_path(store, foundation: FoundationModel, modality: str, layers: list[int]) -> str:
    """Cache file (without extension) keyed on the dataset's items, the modality's source (titles, or
    image files by path, size and mtime), the encoder's weights/preprocessing id and the layers."""
    source = store.modality_source(modality)
    return store._cache_file(f"layers-{modality}", source, foundation.cache_ids[modality], list(layers))


def load_layer_states(
    store,
    foundation: FoundationModel,
    modality: str,
    layers: list[int],
    encode_inputs: Callable[[torch.Tensor], dict],
    present: torch.Tensor,
    batch_size: int = 256,
    show_progress: bool = False,
) -> LayerStates:
    """The ``layers`` summaries of ``modality`` for every item (``store``: an ItemModalityStore),
    loaded memory-mapped from the cache, or computed (items with ``present[item]``, in batches of
    ``encode_inputs(items)``) and cached first."""
    logger = getLogger()
    layers = foundation._check_layers(modality, layers)
    widths = [foundation.layer_widths(modality)[i] for i in layers]
    present = torch.as_tensor(present, dtype=torch.bool).cpu()
    if present.shape != (store.n_items,):
        raise ValueError(f"present must be a bool mask of shape [{store.n_items}], got {tuple(present.shape)}.")
    base = layer_states_path(store, foundation, modality, layers)
    array_file, meta_file = base + ".npy", base + ".json"

    array = _load_cached(array_file, meta_file, layers, widths, store.n_items, warn=True)
    if array is None:
        outputs = [array_file, meta_file, base + ".partial.npy", base + ".partial.json"]
        with build_lock(base, outputs, f"the layer states of item {modality}") as locked:
            # Another process may have built it while we waited.
            array = _load_cached(array_file, meta_file, layers, widths, store.n_items, warn=False)
            if array is None:
                start = time.perf_counter()
                if locked:
                    partial = base + ".partial.npy", base + ".partial.json"
                else:  # no flock here: files of this process's own, so concurrent builds cannot mix (no resume)
                    partial = temp_path(base + ".partial.npy"), temp_path(base + ".partial.json")
                try:
                    _build(store, foundation, modality, layers, widths, encode_inputs, present, batch_size,
                           show_progress, array_file, meta_file, *partial)  # fmt: skip
                finally:
                    if not locked:
                        for leftover in partial:
                            if os.path.isfile(leftover):
                                os.remove(leftover)
                logger.info(
                    f"Layer states of item {modality} (layers {layers}, widths {widths}) built in "
                    f"{time.perf_counter() - start:.1f} s: {array_file}"
                )
                array = np.load(array_file, mmap_mode="r")
                return LayerStates(array, layers, widths, array_file)
    logger.info(f"Layer states of item {modality} (layers {layers}) loaded from cache {array_file}")
    return LayerStates(array, layers, widths, array_file)


def _load_cached(array_file, meta_file, layers, widths, n_items, warn: bool) -> np.ndarray | None:
    """The finished cache file, memory-mapped, if it is there and matches (the sidecar is written
    before the array is renamed into place); else None."""
    if not (os.path.isfile(array_file) and os.path.isfile(meta_file)):
        return None
    with open(meta_file) as f:
        meta = json.load(f)
    array = np.load(array_file, mmap_mode="r")
    if (
        meta.get("layers") == layers
        and meta.get("widths") == widths
        and array.dtype == np.float16
        and array.shape == (n_items, sum(widths))
    ):
        return array
    del array
    if warn:
        getLogger().warning(
            f"Layer-state cache {array_file} does not match layers {layers} / widths {widths}: rebuilding."
        )
    return None


def _build(store, foundation, modality, layers, widths, encode_inputs, present, batch_size, show_progress,
           array_file, meta_file, partial_array, partial_meta) -> None:  # fmt: skip
    """Encode the present items in id order into ``partial_array`` (``<base>.partial.npy``), recording
    after each batch how many are done (``partial_meta``), so an interrupted build resumes where it
    stopped; the finished file is renamed into place last. Runs under the entry's lock."""
    present = present.clone()
    present[0] = False  # the padding item
    items = torch.nonzero(present).flatten()
    # Which items are encoded, and in which order, must match for a resumed build.
    order = hashlib.sha1(items.numpy().astype(np.int64).tobytes()).hexdigest()[:16]
    meta = {"modality": modality, "layers": layers, "widths": widths, "cache_id": foundation.cache_ids[modality],
            "dtype": "float16", "n_items": store.n_items, "items": order}  # fmt: skip
    done = _resumable(partial_array, partial_meta, meta)
    if done:
        array = np.load(partial_array, mmap_mode="r+")
        getLogger().info(f"Resuming the layer states of item {modality}: {done} of {len(items)} items already encoded.")
    else:
        array = np.lib.format.open_memmap(partial_array, mode="w+", dtype=np.float16,
                                          shape=(store.n_items, sum(widths)))  # fmt: skip
        array[:] = 0
    clamped = 0
    chunks = items[done:].split(max(int(batch_size), 1))
    desc = f"Encoding item {modality} layer states (cached)"
    with torch.inference_mode():
        for chunk in tqdm(chunks, desc=desc, disable=not show_progress):
            states = foundation.layer_states(modality, encode_inputs(chunk), layers)
            values = torch.cat([s.float().reshape(len(chunk), -1) for s in states], dim=1).cpu()
            if values.shape[1] != sum(widths):
                raise RuntimeError(f"Layer states of width {values.shape[1]}, expected {sum(widths)} ({widths}).")
            clamped += int((values.abs() > FP16_MAX).sum())
            array[chunk.numpy()] = values.clamp(-FP16_MAX, FP16_MAX).numpy().astype(np.float16)
            array.flush()
            done += len(chunk)
            write_json_atomic(partial_meta, {**meta, "done_items": done})
    if clamped:
        getLogger().warning(f"{clamped} layer-state values of item {modality} exceed float16's range: clamped.")
    del array
    write_json_atomic(meta_file, meta)
    os.replace(partial_array, array_file)  # last: the array's presence marks a complete cache
    os.remove(partial_meta)


def _resumable(partial_array: str, partial_meta: str, meta: dict) -> int:
    """Items already encoded by an interrupted build with the same settings (0: start afresh)."""
    if not (os.path.isfile(partial_array) and os.path.isfile(partial_meta)):
        return 0
    try:
        with open(partial_meta) as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        return 0
    done = recorded.pop("done_items", 0)
    return int(done) if recorded == meta else 0
