"""Item vectors from the foundation model, and the MLP projector onto the recommender's width.

The tower holds the frozen foundation model, each item's inputs (title tokens, image pixels, and
which items have which modality), the learned placeholders for missing modalities and the projector.
The adapter is an adapter family chosen by ``peft_type`` (``recbole_perpeft.adapters``): a peft method
inside the foundation (LoRA, (IA)3, MoDA, ...), a side network beside it (IISAN, CROSSAN), or none
(FROZEN, when the model does not adapt). PerPEFT's per-group adapters and projectors live here too."""

from __future__ import annotations

import copy
from logging import getLogger

import torch
from torch import nn

from recbole_perpeft.adapters.base import GLOBAL_ADAPTER, group_adapter_name
from recbole_perpeft.adapters.registry import FROZEN, get_adapter_family, option, positive_int
from recbole_perpeft.config_values import choice
from recbole_perpeft.data.modality_store import ItemModalityStore, gather_rows
from recbole_perpeft.encoders import build_foundation
from recbole_perpeft.model.length_buckets import MIN_BUCKET, length_buckets, resolve_text_batching
from recbole_perpeft.model.precision import Precision, device_type_of

PROJECTOR_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}
MODALITY_NORMS = ("layernorm", "l2", "none", "official")


class UnitLength(nn.Module):
    """Each vector scaled to unit L2 norm: CLIPModel's image_embeds / text_embeds, the official code's input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x, dim=-1)


class ItemTower(nn.Module):
    def __init__(self, config, dataset, adapt: bool):
        super().__init__()
        self.logger = getLogger()
        self.show_progress = bool(config["show_progress"])
        self.encode_batch_size = positive_int(option(config, "encode_batch_size", 256), "encode_batch_size")
        # Validated before anything heavy is built or cached; the adapter families apply it.
        device = option(config, "device", None)
        self.precision = Precision.from_config(config, device)
        # None: one forward per batch trimmed to its longest title (the bench sets both in turn).
        self.max_padding_ratio = resolve_text_batching(option(config, "text_batching", "auto"), device_type_of(device))
        store = ItemModalityStore(config, dataset)
        self.foundation = build_foundation(config)
        self.modalities = self._available_modalities(config, store)
        self._pixels = None
        self._register_inputs(store)
        self.side = None  # a family with a module beside the foundation registers it here
        family = get_adapter_family(config["peft_type"] if adapt else FROZEN)
        if adapt and option(config, "adapt_layers") is not None and not getattr(family, "top_layers_supported", False):
            raise ValueError(
                f"adapt_layers: {config['adapt_layers']} puts a peft method (LORA, IA3, ...) on the top text layers "
                f"only; peft_type {config['peft_type']} does not adapt inside the encoder (side networks choose "
                "their layers with side_layers). Set adapt_layers: ~."
            )
        self.family = family(config, self, store)
        if "image" in self.modalities:  # the families read has_image per batch: from here on it withholds
            self.has_image = store.withhold_images(self.has_image)
        self._register_family_modules()
        dims = self.family.placeholder_dims
        self.placeholders = nn.ParameterDict({m: nn.Parameter(torch.randn(d) * 0.02) for m, d in dims.items()})
        self.projector = self._projector(config, self.family.out_dims, side_network=self.side is not None)
        # item vector = ID embedding + multimodal_weight * projector(...): 1 here, 0.5 in the official code
        weight = option(config, "multimodal_weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ValueError(f"multimodal_weight must be a number (the weight of the projected modality vector "
                             f"beside the ID embedding), got {weight!r}.")  # fmt: skip
        self.multimodal_weight = float(weight)
        where = f"the per-batch forward of {self.adapted}" if self.adapted else "nothing (no modality is adapted)"
        self.logger.info(f"precision: {self.precision.requested} -> {self.precision.name}, autocast over {where}; "
                         "weights, optimizer, projector and loss in fp32")  # fmt: skip

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

    def _register_inputs(self, store: ItemModalityStore) -> None:
        for m in self.modalities:
            if m == "text":
                tokens = store.text_tokens(
                    self.foundation.tokenizer, self.foundation.text_max_length, self.foundation.cache_ids["text"]
                )
                self.register_buffer("input_ids", tokens["input_ids"], persistent=False)
                self.register_buffer("attention_mask", tokens["attention_mask"], persistent=False)
                self.register_buffer("has_text", store.has_text, persistent=False)
            else:
                # Every image for now: the family builds its caches from has_image (below), and withholding
                # (missing_image_ratio) after them lets one frozen-feature / layer-state cache serve every ratio.
                pixels, has_image = store.image_pixels(self.foundation.image_size)
                self._pixels = pixels  # memory-mapped uint8; rows are gathered per batch
                self.register_buffer("has_image", has_image, persistent=False)
                missing = store.n_items - 1 - int(has_image.sum())
                if missing:
                    self.logger.warning(f"{missing} of {store.n_items - 1} items have no usable image: placeholder.")

    def _register_family_modules(self) -> None:
        for name, module in self.family.modules().items():
            setattr(self, name, module)  # registered as a sub-module: state keys item_tower.<name>.*

    @staticmethod
    def _projector(config, dims: dict[str, int], side_network: bool = False) -> nn.ModuleDict:
        """Per-vector norms and the MLP (keys in properties/model/GlobalPEFT.yaml). The optional LayerNorms
        only add modules, so a default projector's state keys are what they always were."""
        hidden = config["hidden_size"]
        width = positive_int(option(config, "projector_hidden_size", hidden), "projector_hidden_size")
        eps = float(option(config, "projector_layer_norm_eps", 1e-5))
        activation = choice(str(option(config, "projector_activation", "gelu")).lower(), PROJECTOR_ACTIVATIONS,
                            "projector_activation", "(properties/model/GlobalPEFT.yaml)")  # fmt: skip
        norm = choice(str(option(config, "modality_norm", "layernorm")).lower(), MODALITY_NORMS, "modality_norm",
                      "(properties/model/GlobalPEFT.yaml: layernorm, l2 = unit length, none, official)")  # fmt: skip
        if norm == "official":  # CLIPModel's normalised embeddings; the official IISAN's outputs as they are
            norm = "none" if side_network else "l2"
        layers = [nn.Linear(sum(dims.values()), width)]
        if option(config, "projector_hidden_norm", False):  # the official code's LayerNorm before its ReLU
            layers.append(nn.LayerNorm(width, eps=eps))
        layers += [PROJECTOR_ACTIVATIONS[activation](), nn.Dropout(option(config, "projector_dropout", 0.0)),
                   nn.Linear(width, hidden)]  # fmt: skip
        if option(config, "projector_output_norm", False):  # the official code's last LayerNorm
            layers.append(nn.LayerNorm(hidden, eps=eps))
        norms = {m: nn.LayerNorm(d, eps=eps) if norm == "layernorm" else UnitLength() if norm == "l2" else nn.Identity()
                 for m, d in dims.items()}  # fmt: skip
        return nn.ModuleDict({"norms": nn.ModuleDict(norms), "mlp": nn.Sequential(*layers)})

    # --- what the adapter families read ----------------------------------------------------------------

    def item_inputs(self, modality: str, items: torch.Tensor) -> dict:
        """The foundation's inputs for ``items`` (as ``FoundationModel.encode`` takes them)."""
        if modality == "text":
            mask = self.attention_mask[items]
            length = max(int(mask.sum(1).max()), 1)  # trim the padding this batch does not need
            return {"input_ids": self.input_ids[items, :length], "attention_mask": mask[:, :length]}
        return {"pixels": gather_rows(self._pixels, items).to(self.has_image.device)}

    def text_buckets(self, items: torch.Tensor) -> list[torch.Tensor]:
        """Index tensors into ``items`` (which have titles): sub-batches of similar token length whose
        padded tokens stay within ``max_padding_ratio`` of the real ones (``length_buckets``)."""
        if self.max_padding_ratio is None:
            return [torch.arange(len(items), device=items.device)]
        return length_buckets(self.attention_mask[items].sum(1), self.max_padding_ratio, MIN_BUCKET)

    def has(self, modality: str) -> torch.Tensor:
        """[n_items] bool: which items have ``modality``."""
        return getattr(self, f"has_{modality}")

    def active_placeholders(self) -> nn.ParameterDict:
        # PerPEFT's global path (active_group None once groups exist) keeps stage 1's placeholders.
        return self.global_placeholders if self.n_groups and self.active_group is None else self.placeholders

    # --- encoding ------------------------------------------------------------------------------------

    @property
    def peft_models(self) -> list:
        """The peft handles of the adapted encoders (empty unless the family is a peft method)."""
        return self.family.peft_models

    @property
    def adapted(self) -> list[str]:
        """The modalities encoded per batch through an adapter inside the foundation."""
        return self.family.adapted

    @property
    def layer_states(self) -> dict:
        """Side networks: each modality's cached per-layer states."""
        return self.family.layer_states

    @property
    def modality_dims(self) -> dict[str, int]:
        """The width of each per-modality vector that :meth:`encode` returns."""
        return self.family.modality_dims

    def encode(self, items: torch.Tensor) -> tuple[dict, dict]:
        """[U] item ids -> (the named vectors the projector concatenates, one vector per modality)."""
        return self.family.encode(items)

    def project(self, parts: dict) -> torch.Tensor:
        projector = self.projector if self.active_group is None else self.group_projectors[self.active_group]
        normed = torch.cat([projector["norms"][k](v) for k, v in parts.items()], dim=-1)
        return self.multimodal_weight * projector["mlp"](normed)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """[U] item ids -> [U, hidden_size]; callers pass distinct ids so each item is encoded once."""
        return self.project(self.encode(items)[0])

    def present(self, items: torch.Tensor) -> torch.Tensor:
        """[U] bool: the items that have every modality (for cross-modal losses)."""
        return torch.stack([self.has(m)[items] for m in self.modalities]).all(0)

    def adapter_module(self) -> nn.Module:
        """What holds the trainable adapter: the side network, or the foundation (peft inside)."""
        return self.family.adapter_module()

    def is_adapter_key(self, key: str) -> bool:
        """Whether a foundation state key belongs to an adapter (trainable or not right now)."""
        return self.family.is_adapter_key(key)

    # --- per-group adapters and projectors (PerPEFT) ---------------------------------------------------

    active_group: int | None = None
    n_groups = 0
    GLOBAL_ADAPTER = GLOBAL_ADAPTER  # peft families: the global adapter's name; group g's is group_adapter(g)
    group_adapter = staticmethod(group_adapter_name)

    def adapter_parameters(self, adapter: str) -> dict[str, nn.Parameter]:
        """peft families: the foundation's parameters of one named adapter, by name."""
        return self.family.adapter_parameters(adapter)

    def add_groups(self, n_groups: int) -> None:
        """One adapter and one projector per group, each a copy of the global ones (paper §3.3.3); the
        global adapter, projector and placeholders stay, frozen, for the global path."""
        self.family.add_groups(n_groups)
        self._register_family_modules()
        self.group_projectors = nn.ModuleList(copy.deepcopy(self.projector) for _ in range(n_groups))
        self.projector.requires_grad_(False)
        # The placeholders stay shared and trainable; the global path gets a frozen copy, so that it
        # stays the stage-1 model that the groups were fitted on.
        self.global_placeholders = copy.deepcopy(self.placeholders).requires_grad_(False)
        self.n_groups = n_groups
        self.copy_global_to_groups()
        self.activate(None)

    @torch.no_grad()
    def copy_global_to_groups(self) -> None:
        """Every group's adapter and projector := the global ones; the global path's placeholders :=
        the shared ones (after loading a stage-1 state)."""
        self.family.copy_global_to_groups()
        for projector in self.group_projectors:
            projector.load_state_dict(self.projector.state_dict())
        self.global_placeholders.load_state_dict(self.placeholders.state_dict())

    def group_adapter_parameters(self, group: int) -> list[nn.Parameter]:
        return self.family.group_parameters(group)

    def activate(self, group: int | None) -> None:
        """Route items through one group's adapter and projector (None: the global ones)."""
        self.family.activate(group)
        self.active_group = group
