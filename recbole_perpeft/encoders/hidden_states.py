"""Per-layer summary vectors of a frozen encoder for every item, computed once and memory-mapped
from an fp16 .npy cache: what side networks (IISAN, CROSSAN) read instead of running the
foundation model during training. The same builder caches, for ``adapt_layers: k``, every title's
token states entering the first adapted text layer (:func:`load_token_states`), so training runs only
the top k layers.

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

from recbole_perpeft.data.cache_files import build_lock, preallocate, temp_path, write_json_atomic
from recbole_perpeft.data.modality_store import gather_rows
from recbole_perpeft.encoders.base import FoundationModel, select_layers

__all__ = ["LayerStates", "TokenStates", "layer_states_path", "load_layer_states", "load_token_states", "select_layers",
           "token_states_path"]

FP16_MAX = float(np.finfo(np.float16).max)


class LayerStates:
    """Memory-mapped per-layer summaries of every item: ``gather(items)`` -> one float32 tensor per layer."""

    def __init__(self, array: np.ndarray, layers: list[int], widths: list[int], path: str | None = None,
                 build_seconds: float | None = None):  # fmt: skip
        if array.ndim != 2 or array.shape[1] != sum(widths) or len(layers) != len(widths):
            raise ValueError(f"Layer states of shape {array.shape} do not match layers {layers} with widths {widths}.")
        self.array = array
        self.layers = list(layers)
        self.widths = list(widths)
        self.path = path
        self.build_seconds = build_seconds  # None: loaded from the cache

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


class TokenStates(LayerStates):
    """The token states entering one text layer for every item, memory-mapped: [n_items, T * width] float16
    on disk (one "layer" of width T * width to the shared builder), ``gather_tokens`` -> [U, length, width]."""

    def __init__(self, array: np.ndarray, layer: int, seq_len: int, width: int, path: str | None = None,
                 build_seconds: float | None = None):  # fmt: skip
        super().__init__(array, [layer], [seq_len * width], path, build_seconds)
        self.layer, self.seq_len, self.width = layer, seq_len, width

    def gather_tokens(self, items: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """float32 [len(items), length, width] (the first ``length`` tokens, default all) on the items' device."""
        block = gather_rows(self.array, items).view(len(items), self.seq_len, self.width)
        return block[:, : self.seq_len if length is None else length].float().to(items.device)


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
    layers = foundation._check_layers(modality, layers)
    widths = [foundation.layer_widths(modality)[i] for i in layers]
    base = layer_states_path(store, foundation, modality, layers)

    def compute(chunk):  # the attribute is looked up per call: tests swap the encoder's method
        return foundation.layer_states(modality, encode_inputs(chunk), layers)

    meta = {"modality": modality, "layers": layers, "widths": widths, "cache_id": foundation.cache_ids[modality]}
    array, seconds = cached_item_array(store, base, meta, present, compute, f"layer states of item {modality}",
                                       batch_size, show_progress)  # fmt: skip
    return LayerStates(array, layers, widths, base + ".npy", build_seconds=seconds)


def token_states_path(store, foundation: FoundationModel, layer: int, n_layers: int, tokens: dict) -> str:
    """Cache file (without extension) of the title token states entering text layer ``layer`` (of
    ``n_layers``): keyed on the dataset's items, the titles, the encoder's id (weights, pooling, max
    length), a hash of the token ids and attention masks themselves (the tokenisation), the layer and k."""
    digest = hashlib.sha1()
    for key in ("input_ids", "attention_mask"):
        digest.update(np.ascontiguousarray(tokens[key].cpu().numpy().astype(np.int32)).tobytes())
    return store._cache_file(f"tokens-text-layer{layer}", store.modality_source("text"), foundation.cache_ids["text"],
                             digest.hexdigest()[:16], {"layer": layer, "n_layers": n_layers, "k": n_layers - layer})


def load_token_states(
    store,
    foundation: FoundationModel,
    layer: int,
    tokens: dict,
    present: torch.Tensor,
    batch_size: int = 256,
    show_progress: bool = False,
) -> TokenStates:
    """Every title's token states entering text layer ``layer`` (``adapt_layers``: the first adapted one),
    computed once by the frozen lower layers from ``tokens`` (the tower's ``input_ids`` / ``attention_mask``,
    [n_items, T], all T columns kept so rows have one shape) and memory-mapped from an fp16 cache; the
    attention mask stays in the title-token cache, whose contents the key covers."""
    layer_list, _ = foundation.text_layer_stack()
    n_layers = len(layer_list)
    if not 0 <= layer < n_layers:
        raise ValueError(f"text layer {layer} is out of range for a text encoder with {n_layers} layers.")
    seq_len, width = int(tokens["input_ids"].shape[1]), foundation.layer_widths("text")[layer]
    base = token_states_path(store, foundation, layer, n_layers, tokens)

    def compute(chunk):
        return [foundation.text_states_entering(tokens["input_ids"][chunk].long(),
                                                tokens["attention_mask"][chunk].long(), layer)]  # fmt: skip

    meta = {"modality": "text", "entering_layer": layer, "n_layers": n_layers, "seq_len": seq_len,
            "widths": [seq_len * width], "cache_id": foundation.cache_ids["text"]}  # fmt: skip
    what = f"token states entering text layer {layer}"
    array, seconds = cached_item_array(store, base, meta, present, compute, what, batch_size, show_progress)
    return TokenStates(array, layer, seq_len, width, base + ".npy", build_seconds=seconds)


def cached_item_array(store, base: str, meta: dict, present, compute: Callable[[torch.Tensor], list],
                      what: str, batch_size: int, show_progress: bool) -> tuple[np.ndarray, float | None]:  # fmt: skip
    """``<base>.npy``: [n_items, sum(meta["widths"])] float16, memory-mapped; built first (rows of the
    ``present`` items from ``compute(items)``, a list of tensors flattened side by side) under the entry's
    lock when missing or not matching ``meta``. Returns the array and the build's seconds (None: loaded)."""
    logger = getLogger()
    present = torch.as_tensor(present, dtype=torch.bool).cpu()
    if present.shape != (store.n_items,):
        raise ValueError(f"present must be a bool mask of shape [{store.n_items}], got {tuple(present.shape)}.")
    array_file, meta_file = base + ".npy", base + ".json"
    meta = {**meta, "dtype": "float16", "n_items": store.n_items}
    array = _load_cached(array_file, meta_file, meta, warn=True)
    if array is None:
        outputs = [array_file, meta_file, base + ".partial.npy", base + ".partial.json"]
        with build_lock(base, outputs, f"the {what}") as locked:
            # Another process may have built it while we waited.
            array = _load_cached(array_file, meta_file, meta, warn=False)
            if array is None:
                start = time.perf_counter()
                if locked:
                    partial = base + ".partial.npy", base + ".partial.json"
                else:  # no flock here: files of this process's own, so concurrent builds cannot mix (no resume)
                    partial = temp_path(base + ".partial.npy"), temp_path(base + ".partial.json")
                try:
                    _build(store, meta, compute, what, present, batch_size, show_progress, array_file, meta_file,
                           *partial)  # fmt: skip
                finally:
                    if not locked:
                        for leftover in partial:
                            if os.path.isfile(leftover):
                                os.remove(leftover)
                seconds = time.perf_counter() - start
                logger.info(f"The {what} (widths {meta['widths']}) built in {seconds:.1f} s: {array_file}")
                return np.load(array_file, mmap_mode="r"), seconds
    logger.info(f"The {what} loaded from cache {array_file}")
    return array, None


def _load_cached(array_file, meta_file, meta: dict, warn: bool) -> np.ndarray | None:
    """The finished cache file, memory-mapped, if it is there and matches ``meta`` (the sidecar is written
    before the array is renamed into place); else None."""
    if not (os.path.isfile(array_file) and os.path.isfile(meta_file)):
        return None
    with open(meta_file) as f:
        recorded = json.load(f)
    array = np.load(array_file, mmap_mode="r")
    matches = all(recorded.get(key) == value for key, value in meta.items())
    if matches and array.dtype == np.float16 and array.shape == (meta["n_items"], sum(meta["widths"])):
        return array
    del array
    if warn:
        getLogger().warning(f"Cache {array_file} does not match {meta}: rebuilding.")
    return None


def _build(store, meta, compute, what, present, batch_size, show_progress, array_file, meta_file, partial_array,
           partial_meta) -> None:  # fmt: skip
    """Encode the present items in id order into ``partial_array`` (``<base>.partial.npy``), recording
    after each batch how many are done (``partial_meta``), so an interrupted build resumes where it
    stopped; the finished file is renamed into place last. Runs under the entry's lock."""
    present = present.clone()
    present[0] = False  # the padding item
    items = torch.nonzero(present).flatten()
    # Which items are encoded, and in which order, must match for a resumed build.
    order = hashlib.sha1(items.numpy().astype(np.int64).tobytes()).hexdigest()[:16]
    meta = {**meta, "items": order}
    width = sum(meta["widths"])
    done = _resumable(partial_array, partial_meta, meta)
    if done:
        array = np.load(partial_array, mmap_mode="r+")
        getLogger().info(f"Resuming the {what}: {done} of {len(items)} items already encoded.")
    else:
        array = np.lib.format.open_memmap(partial_array, mode="w+", dtype=np.float16, shape=(store.n_items, width))
        try:
            preallocate(partial_array)  # a full disk: one error line, not SIGBUS on the first write
        except OSError:
            del array
            os.remove(partial_array)
            raise
        array[:] = 0
    clamped = 0
    chunks = items[done:].split(max(int(batch_size), 1))
    with torch.inference_mode():
        for chunk in tqdm(chunks, desc=f"Encoding the {what} (cached)", disable=not show_progress):
            values = torch.cat([s.float().reshape(len(chunk), -1) for s in compute(chunk)], dim=1).cpu()
            if values.shape[1] != width:
                raise RuntimeError(f"The {what} are {values.shape[1]} wide, expected {width} ({meta['widths']}).")
            clamped += int((values.abs() > FP16_MAX).sum())
            array[chunk.numpy()] = values.clamp(-FP16_MAX, FP16_MAX).numpy().astype(np.float16)
            array.flush()
            done += len(chunk)
            write_json_atomic(partial_meta, {**meta, "done_items": done})
    if clamped:
        getLogger().warning(f"{clamped} values of the {what} exceed float16's range: clamped.")
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
