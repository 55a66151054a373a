"""FROZEN: no adapter (FrozenMM). Per modality the frozen encoder's vector of every item, computed once
and cached on disk, with a learned placeholder for items without the modality.

Also the base of the peft families (``peft_adapter.py``), which encode their adapted modalities per
batch and the others from the same cache."""

from __future__ import annotations

import os

import torch
from torch import nn
from tqdm import tqdm

from recbole_perpeft.adapters.base import AdapterFamily
from recbole_perpeft.adapters.registry import FROZEN, register_adapter_family
from recbole_perpeft.data.cache_files import atomic_output, build_lock


class FrozenFeatures(nn.Module):
    """Per modality, the frozen vectors of all items [n_items, width], as attributes named by modality.
    Non-persistent buffers: they follow the model's device but are not checkpointed (they are read back
    from the disk cache)."""

    def __init__(self, tables: dict[str, torch.Tensor]):
        super().__init__()
        for modality, table in tables.items():
            self.register_buffer(modality, table, persistent=False)

    def __contains__(self, modality: str) -> bool:
        return modality in self._buffers


def frozen_features(tower, store, modality: str, encode) -> torch.Tensor:
    """The frozen encoder's vector for every item (zeros for items without the modality), computed once
    with ``encode(modality, items)`` and cached on disk (keyed on the titles, or the image files' paths,
    sizes and mtimes; built under the entry's lock, written atomically: runs sharing a cache_dir compute
    it once)."""
    foundation = tower.foundation
    path = store._cache_file(f"features-{modality}", store.modality_source(modality), foundation.cache_ids[modality])
    path += ".pt"
    if not os.path.isfile(path):
        with build_lock(path, [path], f"the frozen {modality} features"):
            if not os.path.isfile(path):  # another process may have written it while we waited
                has = tower.has(modality)
                features = torch.zeros(len(has), foundation.out_dims[modality])
                chunks = torch.nonzero(has).flatten().split(tower.encode_batch_size)
                with torch.inference_mode():
                    desc = f"Encoding item {modality} (frozen, cached)"
                    for chunk in tqdm(chunks, desc=desc, disable=not tower.show_progress):
                        features[chunk] = encode(modality, chunk).float()
                with atomic_output(path) as tmp:
                    torch.save(features, tmp)
                return features
    return torch.load(path, weights_only=True)


@register_adapter_family(FROZEN)
class FrozenFamily(AdapterFamily):
    def __init__(self, config, tower, store):
        super().__init__(config, tower, store)
        dims = {m: self.foundation.out_dims[m] for m in tower.modalities}
        self.out_dims, self.modality_dims, self.placeholder_dims = dict(dims), dict(dims), dict(dims)
        frozen = [m for m in tower.modalities if m not in self.adapted]
        self.features = FrozenFeatures({m: frozen_features(tower, store, m, self.foundation_vectors) for m in frozen})

    def modules(self) -> dict[str, nn.Module]:
        return {"features": self.features}

    _frozen_linears: list | None = None

    def frozen_linears(self) -> list[nn.Linear]:
        """The foundation's own linear layers (no adapter's), for :meth:`Precision.lowered`."""
        if self._frozen_linears is None:
            self._frozen_linears = [m for n, m in self.foundation.named_modules()
                                    if isinstance(m, nn.Linear) and not self.is_adapter_key(f"{n}.weight")]  # fmt: skip
        return self._frozen_linears

    def foundation_vectors(self, modality: str, items: torch.Tensor) -> torch.Tensor:
        """The foundation's vectors of ``items`` (all having ``modality``), adapter included if any."""
        return self.foundation.encode(modality, self.tower.item_inputs(modality, items))

    def adapted_vectors(self, modality: str, items: torch.Tensor) -> torch.Tensor:
        """The per-batch encode of an adapted modality (the trainable path, and the only one under the
        run's ``precision``: the frozen caches above are fp32): titles in length buckets, each trimmed to
        its longest title, the vectors put back in the order of ``items``; float32 out."""
        buckets = self.tower.text_buckets(items) if modality == "text" else []
        device, precision = items.device.type, self.tower.precision
        with precision.autocast(device), precision.lowered(self.frozen_linears(), device):
            if len(buckets) <= 1:
                return self.foundation_vectors(modality, items).float()
            parts = [self.foundation_vectors(modality, items[bucket]) for bucket in buckets]
        return torch.cat(parts).float()[torch.argsort(torch.cat(buckets))]  # back to the order of items

    def modality_vector(self, modality: str, items: torch.Tensor) -> torch.Tensor:
        """[U, width]: the cached or freshly encoded vector of each item, its placeholder if it lacks the
        modality."""
        has = self.tower.has(modality)[items]
        placeholder = self.tower.active_placeholders()[modality].expand(len(items), -1)
        if modality in self.features:
            return torch.where(has.unsqueeze(1), getattr(self.features, modality)[items], placeholder)
        vectors = placeholder.clone()
        present = items[has]
        if len(present):
            vectors = vectors.index_put((torch.nonzero(has).flatten(),), self.adapted_vectors(modality, present))
        return vectors

    def encode(self, items: torch.Tensor) -> tuple[dict, dict]:
        vectors = {m: self.modality_vector(m, items) for m in self.tower.modalities}
        return vectors, vectors
