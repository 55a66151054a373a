"""Item vectors from the foundation model, and the MLP projector onto the recommender's width.

Two adapter families (``peft_type``): a peft method inside the foundation (LoRA, (IA)3, MoDA, ...):
per-modality vectors, adapted (encoded per batch) or frozen (computed once, cached), with learned
placeholders for missing modalities; or a side network (IISAN, CROSSAN) beside it, reading cached
per-layer states, so the foundation never runs in training."""

from __future__ import annotations

import copy
import os
import re
from logging import getLogger

import torch
from torch import nn
from tqdm import tqdm

from recbole_perpeft.adapters import attach_peft, is_moda, set_condition
from recbole_perpeft.adapters.side_network import build_side_network, is_side_network
from recbole_perpeft.data.cache_files import atomic_output, build_lock
from recbole_perpeft.data.modality_store import ItemModalityStore, gather_rows
from recbole_perpeft.encoders import build_foundation
from recbole_perpeft.encoders.hidden_states import load_layer_states, select_layers


class ItemTower(nn.Module):
    def __init__(self, config, dataset, adapt: bool):
        super().__init__()
        self.logger = getLogger()
        self.show_progress = bool(config["show_progress"])
        self.encode_batch_size = config["encode_batch_size"] or 256
        store = ItemModalityStore(config, dataset)
        self.foundation = build_foundation(config)
        self.modalities = self._available_modalities(config, store)
        peft_type = str(config["peft_type"]).upper()
        uses_side_network = adapt and is_side_network(peft_type)
        adapted = [m for m in self.modalities if m == "text" or config["adapt_image_tower"]] if adapt else []
        self.adapted = [] if uses_side_network else adapted
        # Handles to the peft wrappers (add/switch named adapters); not registered as sub-modules,
        # the adapted layers already live inside self.foundation.
        peft_kwargs = dict((config["peft_defaults"] or {}).get(peft_type) or {})
        peft_kwargs.update(config["peft_config"] or {})
        if peft_type == "MODA":  # MoDA's gate condition: the modality the layer is encoding
            peft_kwargs.setdefault("n_conditions", len(self.foundation.modalities))
        self.peft_models = [
            attach_peft(module, peft_type, peft_kwargs)
            for module in self.foundation.peft_backbones(self.adapted).values()
        ]
        self.moda = any(is_moda(handle) for handle in self.peft_models)

        self._pixels = None
        self.n_groups = 0
        for m in self.modalities:
            if m == "text":
                tokens = store.text_tokens(
                    self.foundation.tokenizer, self.foundation.text_max_length, self.foundation.cache_ids["text"]
                )
                self.register_buffer("input_ids", tokens["input_ids"], persistent=False)
                self.register_buffer("attention_mask", tokens["attention_mask"], persistent=False)
                self.register_buffer("has_text", store.has_text, persistent=False)
            else:
                pixels, has_image = store.image_pixels(self.foundation.image_size)
                self._pixels = pixels  # memory-mapped uint8; rows are gathered per batch
                self.register_buffer("has_image", has_image, persistent=False)
                missing = store.n_items - 1 - int(has_image.sum())
                if missing:
                    self.logger.warning(f"{missing} of {store.n_items - 1} items have no usable image: placeholder.")
        self.side = None
        if uses_side_network:
            self.layer_states = self._layer_states(config, store)
            self.side = build_side_network(peft_type, {m: s.widths for m, s in self.layer_states.items()}, config)
            dims = self.side.out_dims
            self.placeholders = nn.ParameterDict()  # the side network has its own, per block
        else:
            for m in self.modalities:
                if m not in self.adapted:
                    self.register_buffer(f"features_{m}", self._frozen_features(m, store), persistent=False)
            dims = {m: self.foundation.out_dims[m] for m in self.modalities}
            self.placeholders = nn.ParameterDict({m: nn.Parameter(torch.randn(d) * 0.02) for m, d in dims.items()})
        hidden, width = config["hidden_size"], config["projector_hidden_size"] or config["hidden_size"]
        self.projector = nn.ModuleDict(
            {
                "norms": nn.ModuleDict({m: nn.LayerNorm(d) for m, d in dims.items()}),
                "mlp": nn.Sequential(
                    nn.Linear(sum(dims.values()), width),
                    nn.GELU(),
                    nn.Dropout(config["projector_dropout"] or 0.0),
                    nn.Linear(width, hidden),
                ),
            }
        )

    def _available_modalities(self, config, store) -> list[str]:
        wanted = list(config["modalities"] or self.foundation.modalities)
        if "image" in wanted and not store.image_availability().any():
            self.logger.warning(
                f"No item images found in image_dir={config['image_dir']}: running text-only. Put images "
                "there as <item_id>.jpg (or set image_field) for a multimodal run."
            )
            wanted.remove("image")
        if not wanted:
            raise ValueError("No modality left: the dataset has neither usable titles nor images.")
        self.logger.info(f"Item modalities: {wanted}")
        return wanted

    # --- encoding ------------------------------------------------------------------------------------

    def _inputs(self, modality: str, items: torch.Tensor) -> dict:
        if modality == "text":
            mask = self.attention_mask[items]
            length = max(int(mask.sum(1).max()), 1)  # trim the padding this batch does not need
            return {"input_ids": self.input_ids[items, :length], "attention_mask": mask[:, :length]}
        return {"pixels": gather_rows(self._pixels, items).to(self.has_image.device)}

    def _encode(self, modality: str, items: torch.Tensor) -> torch.Tensor:
        if self.moda:
            set_condition(self.foundation, self.foundation.modalities.index(modality))
        return self.foundation.encode(modality, self._inputs(modality, items))

    def _layer_states(self, config, store: ItemModalityStore) -> dict:
        """Each modality's selected per-layer states for every item, from the on-disk cache (built
        once, with a progress bar). ``side_layers``: None (every ``side_layer_stride``-th hidden
        state, the last included), a list of hidden-state indices, or such a list per modality."""
        spec = config["side_layers"]
        states = {}
        for m in self.modalities:
            layers = select_layers(
                self.foundation.num_layer_states(m),
                spec.get(m) if isinstance(spec, dict) else spec,
                config["side_layer_stride"] or 2,
            )
            states[m] = load_layer_states(
                store, self.foundation, m, layers,
                encode_inputs=lambda items, m=m: self._inputs(m, items),
                present=getattr(self, f"has_{m}"),
                batch_size=self.encode_batch_size,
                show_progress=self.show_progress,
            )
        return states

    def _frozen_features(self, modality: str, store: ItemModalityStore) -> torch.Tensor:
        """The frozen encoder's vector for every item, computed once and cached on disk (keyed on the
        titles, or the image files' paths, sizes and mtimes; built under the entry's lock, written
        atomically: runs sharing a cache_dir compute it once)."""
        source = store.modality_source(modality)
        path = store._cache_file(f"features-{modality}", source, self.foundation.cache_ids[modality]) + ".pt"
        if not os.path.isfile(path):
            with build_lock(path, [path], f"the frozen {modality} features"):
                if not os.path.isfile(path):  # another process may have written it while we waited
                    features = self._encode_all(modality)
                    with atomic_output(path) as tmp:
                        torch.save(features, tmp)
                    return features
        return torch.load(path, weights_only=True)

    def _encode_all(self, modality: str) -> torch.Tensor:
        has = self.has_text if modality == "text" else self.has_image
        items = torch.nonzero(has).flatten()
        features = torch.zeros(len(has), self.foundation.out_dims[modality])
        chunks = items.split(self.encode_batch_size)
        with torch.inference_mode():
            desc = f"Encoding item {modality} (frozen, cached)"
            for chunk in tqdm(chunks, desc=desc, disable=not self.show_progress):
                features[chunk] = self._encode(modality, chunk).float()
        return features

    def modality_vector(self, modality: str, items: torch.Tensor) -> torch.Tensor:
        has = getattr(self, f"has_{modality}")[items]
        # PerPEFT's global path (active_group None once groups exist) keeps stage 1's placeholders.
        placeholders = self.global_placeholders if self.n_groups and self.active_group is None else self.placeholders
        placeholder = placeholders[modality].expand(len(items), -1)
        if modality not in self.adapted:
            return torch.where(has.unsqueeze(1), getattr(self, f"features_{modality}")[items], placeholder)
        vectors = placeholder.clone()
        present = items[has]
        if len(present):
            vectors = vectors.index_put((torch.nonzero(has).flatten(),), self._encode(modality, present).float())
        return vectors

    def encode(self, items: torch.Tensor) -> tuple[dict, dict]:
        """[U] item ids -> (the named vectors the projector concatenates, one vector per modality)."""
        if self.side is None:
            vectors = {m: self.modality_vector(m, items) for m in self.modalities}
            return vectors, vectors
        side = self.side if self.active_group is None else self.group_sides[self.active_group]
        states = {m: self.layer_states[m].gather(items) for m in self.modalities}
        return side(states, {m: getattr(self, f"has_{m}")[items] for m in self.modalities})

    def project(self, parts: dict) -> torch.Tensor:
        projector = self.projector if self.active_group is None else self.group_projectors[self.active_group]
        return projector["mlp"](torch.cat([projector["norms"][k](v) for k, v in parts.items()], dim=-1))

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """[U] item ids -> [U, hidden_size]; callers pass distinct ids so each item is encoded once."""
        return self.project(self.encode(items)[0])

    def present(self, items: torch.Tensor) -> torch.Tensor:
        """[U] bool: the items that have every modality (for cross-modal losses)."""
        masks = [getattr(self, f"has_{m}")[items] for m in self.modalities]
        return torch.stack(masks).all(0)

    def adapter_module(self) -> nn.Module:
        """What holds the trainable adapter: the side network, or the foundation (peft inside)."""
        return self.foundation if self.side is None else self.side

    # --- per-group adapters and projectors (PerPEFT) ---------------------------------------------------

    active_group: int | None = None
    GLOBAL_ADAPTER = "default"

    @staticmethod
    def group_adapter(group: int) -> str:
        return f"group_{group}"

    def adapter_names(self) -> list[str]:
        return [name for handle in self.peft_models for name in handle.peft_config]

    def is_adapter_key(self, key: str) -> bool:
        """Whether a foundation state key belongs to any peft adapter (trainable or not right now)."""
        return any(f".{a}." in key or key.endswith(f".{a}") for a in self.adapter_names())

    def adapter_parameters(self, adapter: str) -> dict[str, nn.Parameter]:
        """The foundation's parameters that belong to one named peft adapter."""
        return {
            name: p
            for name, p in self.foundation.named_parameters()
            if f".{adapter}." in name or name.endswith(f".{adapter}")
        }

    def add_groups(self, n_groups: int) -> None:
        """One adapter (peft named adapter, or side network copy) and one projector per group, each
        a copy of the global ones (paper §3.3.3); the global adapter, projector and placeholders stay,
        frozen, for the global path. MoDA's named adapters hold only a gate: the expert pool stays
        the global adapter's, shared by the groups and frozen (groups mix it differently)."""
        if self.side is not None:
            self.group_sides = nn.ModuleList(copy.deepcopy(self.side) for _ in range(n_groups))
            self.side.requires_grad_(False)
        for group in range(n_groups):
            for handle in self.peft_models:
                handle.add_adapter(self.group_adapter(group), handle.peft_config[self.GLOBAL_ADAPTER])
        self.group_projectors = nn.ModuleList(copy.deepcopy(self.projector) for _ in range(n_groups))
        self.projector.requires_grad_(False)
        # The placeholders stay shared and trainable; the global path gets a frozen copy, so that it
        # stays the stage-1 model that the groups were fitted on.
        self.global_placeholders = copy.deepcopy(self.placeholders).requires_grad_(False)
        self.n_groups = n_groups
        self.copy_global_to_groups()
        self.activate(None)

    def _global_key(self, key: str, adapter: str) -> str:
        return re.sub(rf"\.{adapter}(\.|$)", rf".{self.GLOBAL_ADAPTER}\1", key)

    @torch.no_grad()
    def copy_global_to_groups(self) -> None:
        """Every group's adapter and projector := the global ones; the global path's placeholders :=
        the shared ones (after loading a stage-1 state)."""
        global_adapter = self.adapter_parameters(self.GLOBAL_ADAPTER)
        for group in range(self.n_groups):
            name = self.group_adapter(group)
            for key, param in self.adapter_parameters(name).items():
                param.copy_(global_adapter[self._global_key(key, name)])
            if self.side is not None:
                self.group_sides[group].load_state_dict(self.side.state_dict())
            self.group_projectors[group].load_state_dict(self.projector.state_dict())
        self.global_placeholders.load_state_dict(self.placeholders.state_dict())

    def group_adapter_parameters(self, group: int) -> list[nn.Parameter]:
        if self.side is not None:
            return list(self.group_sides[group].parameters())
        return list(self.adapter_parameters(self.group_adapter(group)).values())

    def activate(self, group: int | None) -> None:
        """Route items through one group's adapter and projector (None: the global ones).

        peft's set_adapter also flips requires_grad; we keep every group's adapter trainable (one
        optimizer for all groups: an inactive adapter simply gets no gradient) and the global one frozen."""
        name = self.GLOBAL_ADAPTER if group is None else self.group_adapter(group)
        for handle in self.peft_models:
            handle.set_adapter(name)
        for adapter in [self.GLOBAL_ADAPTER] + [self.group_adapter(g) for g in range(self.n_groups)]:
            for param in self.adapter_parameters(adapter).values():
                param.requires_grad_(adapter != self.GLOBAL_ADAPTER)
        self.active_group = group
