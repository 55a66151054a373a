"""HF peft methods inside the foundation model: one generic family for every peft ``PeftType``.

``peft_type`` is any peft method name (LORA, IA3, LOHA, ...) and ``peft_config`` the keyword arguments
of its config class, over the defaults in ``properties/adapter/<TYPE>.yaml`` (``peft_config``, and
``peft_targets``: target modules per encoder architecture, from the paper). A method without a YAML
gets peft's own per-architecture defaults, so a new peft method needs no code. Adapted modalities
(text, and image with ``adapt_image_tower``) are encoded per batch; the others come from the frozen
cache (``frozen.py``). PerPEFT's groups are peft named adapters (``group_<g>``) beside ``default``.

``adapt_layers: k`` (not the paper's setting, which adapts every layer): the adapter goes on the top k layers
of the text encoder only (peft's ``layers_to_transform`` / ``layers_pattern``; a method without them, such as
(IA)3, gets its ``target_modules`` as a full-match pattern restricted to those layers, peft's own matching),
and every title's token states entering the first of them are computed once by the frozen lower layers and
memory-mapped from an fp16 cache (``encoders/hidden_states.py``): a step runs forward and backward through
the top k layers and the pooling only."""

from __future__ import annotations

import dataclasses
import re
from logging import getLogger

import torch
from peft import PEFT_TYPE_TO_CONFIG_MAPPING, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from recbole_perpeft.adapters.base import GLOBAL_ADAPTER, group_adapter_name, named_adapter_parameters
from recbole_perpeft.adapters.frozen import FrozenFamily
from recbole_perpeft.adapters.registry import (
    family_defaults,
    family_settings,
    get_adapter_family,
    option,
    register_adapter_family,
)
from recbole_perpeft.encoders.hidden_states import load_token_states

ALPHA_KEYS = ("lora_alpha", "alpha")  # the scale numerator next to r (LoRA & co.; LoHa/LoKr)


def encoder_type(module) -> str | None:
    """The key of ``peft_targets`` for a backbone: its transformers ``model_type``, a CLIP tower as clip."""
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    return "clip" if model_type in ("clip_text_model", "clip_vision_model") else model_type


def build_peft_config(peft_type: str, model_type: str | None, overrides: dict | None = None, targets=None):
    """peft's config object for ``peft_type`` on an encoder of ``model_type``: the encoder's entry of
    ``targets`` (default: the YAML's ``peft_targets``), the YAML's ``peft_config``, then ``overrides``
    (whose ``target_modules``, if any, replace the targets')."""
    family = get_adapter_family(peft_type)
    if not issubclass(family, PeftFamily):
        raise ValueError(f"peft_type '{peft_type}' is a side network or no adapter, not a peft method.")
    key = str(peft_type).upper()
    defaults = family_defaults(key)
    targets = (defaults.get("peft_targets") or {}) if targets is None else targets
    kwargs = {**(targets.get(model_type) or {}), **(defaults.get("peft_config") or {}), **(overrides or {})}
    try:
        return family.config_class(key)(**kwargs)
    except TypeError as err:
        raise ValueError(f"peft_config does not fit peft's {key} config: {err}") from err


def top_layers_kwargs(peft_type: str, kwargs: dict, targets: dict, module, layers: list[int], pattern: str) -> dict:
    """``kwargs`` for peft's ``peft_type`` config restricted to the transformer layers ``layers`` (indices in
    the list named ``pattern`` in ``module``'s paths): peft's ``layers_to_transform`` / ``layers_pattern``
    where the method has them, else ``target_modules`` as a full-match pattern over those layers' targets."""
    family = get_adapter_family(peft_type)
    fields = {f.name for f in dataclasses.fields(family.config_class(str(peft_type).upper()))}
    given = [key for key in ("layers_to_transform", "layers_pattern") if kwargs.get(key) is not None]
    if given:
        raise ValueError(f"adapt_layers picks the adapted layers itself: remove {given} from peft_config, or set "
                         "adapt_layers: ~ to choose layers with peft_config alone.")  # fmt: skip
    if "layers_to_transform" in fields:
        return {**kwargs, "layers_to_transform": list(layers), "layers_pattern": pattern}
    names = getattr(build_peft_config(peft_type, encoder_type(module), kwargs, targets), "target_modules", None)
    if "target_modules" not in fields or names is None or isinstance(names, str):
        raise ValueError(
            f"adapt_layers: peft's {peft_type} config has no layers_to_transform, and its target_modules "
            f"({names!r}) is not a list of module names to restrict to the top layers. Use a method with "
            "layers_to_transform (LORA, LOHA, LOKR, ...), give peft_config: {target_modules: [...]}, or set "
            "adapt_layers: ~."
        )
    indices = "|".join(map(str, layers))
    modules = "|".join(re.escape(name) for name in sorted(names))
    # peft full-matches a str target against each module path; a listed name matches a path ending in ".<name>".
    return {**kwargs, "target_modules": rf"(?:.*\.)?{re.escape(pattern)}\.(?:{indices})\.(?:.*\.)?(?:{modules})"}


def attach_peft(module, peft_type: str, overrides: dict | None = None, adapter_name: str = GLOBAL_ADAPTER,
                targets: dict | None = None):  # fmt: skip
    """Inject a peft method into ``module`` in place; return the ``PeftModel`` handle (used to add
    and switch named adapters). Only the adapter's parameters stay trainable."""
    peft_config = build_peft_config(peft_type, encoder_type(module), overrides, targets)
    try:
        return get_peft_model(module, peft_config, adapter_name=adapter_name)
    except (ValueError, AssertionError, TypeError) as err:
        raise ValueError(
            f"peft could not attach {peft_type} to {type(module).__name__}: {err}. Set peft_config's "
            "target_modules to layers of this encoder."
        ) from err


@register_adapter_family(*PEFT_TYPE_TO_CONFIG_MAPPING)
class PeftFamily(FrozenFamily):
    """Any peft method, attached to the encoders of the adapted modalities."""

    name = None  # one class for many names: the run's peft_type (see __init__)
    top_layers_supported = True  # adapt_layers: k works (the item tower refuses it for other families)

    @staticmethod
    def config_class(peft_type: str) -> type:
        return PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]

    @classmethod
    def peft_kwargs(cls, config, peft_type: str) -> tuple[dict, dict]:
        """(peft_config keywords, peft_targets) for the run: the YAML's, then the deprecated
        ``peft_defaults[peft_type]`` if a config still has it, then the user's ``peft_config``."""
        settings = family_settings(peft_type, config)
        kwargs = dict(family_defaults(peft_type).get("peft_config") or {})
        legacy = (option(config, "peft_defaults", {}) or {}).get(peft_type) or {}
        changed = {k: v for k, v in legacy.items() if kwargs.get(k, object()) != v}
        if changed:
            getLogger().warning(
                f"peft_defaults is deprecated: the {peft_type} defaults live in recbole_perpeft/properties/adapter/"
                f"{peft_type}.yaml; set peft_config instead. Applying its {changed} over them."
            )
        kwargs.update(legacy)
        kwargs.update(option(config, "peft_config", {}) or {})
        return kwargs, settings.get("peft_targets") or {}

    def __init__(self, config, tower, store):
        self.name = str(config["peft_type"]).upper()
        self.adapted = [m for m in tower.modalities if m == "text" or config["adapt_image_tower"]]
        kwargs, targets = self.peft_kwargs(config, self.name)
        kwargs = self.complete_kwargs(kwargs, tower)
        backbones = tower.foundation.peft_backbones(self.adapted)
        self.top_layer = self.first_adapted_layer(config, tower.foundation)  # None: every layer (the paper's)
        self.token_states = None
        if self.top_layer is not None:
            stack, pattern = tower.foundation.text_layer_stack()
            kwargs = top_layers_kwargs(self.name, kwargs, targets, backbones["text"], range(self.top_layer, len(stack)),
                                       pattern)  # fmt: skip
        # Handles to the peft wrappers (add/switch named adapters), not modules of the tower: the
        # adapted layers already live inside the foundation.
        self.peft_models = [attach_peft(module, self.name, kwargs, targets=targets) for module in backbones.values()]
        super().__init__(config, tower, store)  # after attaching: frozen features of the other modalities
        if self.top_layer is not None:
            tokens = {"input_ids": tower.input_ids, "attention_mask": tower.attention_mask}
            self.token_states = load_token_states(store, self.foundation, self.top_layer, tokens, tower.has("text"),
                                                  tower.encode_batch_size, tower.show_progress)  # fmt: skip
            self.check_top_layers()

    def first_adapted_layer(self, config, foundation) -> int | None:
        """``adapt_layers`` (None: every layer) as the index of the first adapted text layer, validated."""
        k = option(config, "adapt_layers", None)
        if k is None:
            return None
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"adapt_layers must be ~ (every layer, the paper's setting) or a positive int k (the "
                             f"top k text layers), got {k!r}.")  # fmt: skip
        if any(m != "text" for m in self.adapted):
            raise ValueError(
                f"adapt_layers: {k} adapts only the top layers of the text encoder, but adapt_image_tower: True also "
                f"adapts the {type(foundation).__name__} image tower, which has no top-layer cache (its states "
                "would be a cache per image patch). Set adapt_image_tower: False (image features frozen and cached) "
                "or adapt_layers: ~."
            )
        if "text" not in self.adapted:
            getLogger().warning(f"adapt_layers: {k} has nothing to act on: no text encoder is adapted in this run.")
            return None
        n_layers = len(foundation.text_layer_stack()[0])
        if k > n_layers:
            raise ValueError(f"adapt_layers: {k}, but the text encoder has {n_layers} layers: use 1..{n_layers}, or ~ "
                             "for every layer.")  # fmt: skip
        getLogger().info(
            f"adapt_layers: {k} of {n_layers} text layers carry the {self.name} adapter (layers {n_layers - k}.."
            f"{n_layers - 1}); the token states entering layer {n_layers - k} are cached. Not the paper's setting, "
            "which adapts every layer."
        )
        return n_layers - k

    def foundation_vectors(self, modality: str, items: torch.Tensor) -> torch.Tensor:
        if modality == "text" and self.token_states is not None:
            return self.top_layer_vectors(items)
        return super().foundation_vectors(modality, items)

    def top_layer_vectors(self, items: torch.Tensor) -> torch.Tensor:
        """``adapt_layers``: the cached token states of ``items`` (trimmed to their longest title) through the
        adapted top layers and the pooling; the frozen lower layers do not run."""
        inputs = self.tower.item_inputs("text", items)
        hidden = self.token_states.gather_tokens(items, inputs["input_ids"].shape[1])
        return self.foundation.encode_text_from(self.top_layer, hidden, inputs["input_ids"].long(),
                                                inputs["attention_mask"].long())  # fmt: skip

    @torch.no_grad()
    def check_top_layers(self, n_items: int = 8, tolerance: float = 1e-2) -> None:
        """A few titles through the cache and the top layers against the full encoder (same adapter): a
        mismatch beyond the fp16 rounding of the cached states means a stale cache or an encoder whose
        layers do not run alone as assumed; an error then, not silently different vectors."""
        items = torch.nonzero(self.tower.has("text")).flatten()[:n_items].to(self.tower.input_ids.device)
        if not len(items):
            return
        training = self.foundation.training
        self.foundation.train(False)  # adapter dropout off: both paths compute the same function
        try:
            cached = self.foundation_vectors("text", items)  # (MoDA sets its condition here)
            full = FrozenFamily.foundation_vectors(self, "text", items)
        finally:
            self.foundation.train(training)
        error = float((cached - full).norm() / full.norm().clamp_min(1e-12))
        if not error <= tolerance:
            raise RuntimeError(
                f"adapt_layers: item vectors through the cached token states differ from the full encoder's by "
                f"{error:.2e} (relative; fp16 caching accounts for about 1e-3): cache {self.token_states.path}. "
                "Delete that file to rebuild it; if the error remains, this encoder cannot run its top layers "
                "alone: set adapt_layers: ~."
            )

    def complete_kwargs(self, kwargs: dict, tower) -> dict:
        """Keywords a family derives from the tower (MoDA: its number of conditions)."""
        return kwargs

    def adapter_parameters(self, adapter: str) -> dict[str, nn.Parameter]:
        """The parameters of one named adapter, by their names in the foundation."""
        return named_adapter_parameters(self.foundation, adapter)

    # --- per-group adapters ------------------------------------------------------------------------------

    _switched: tuple[list, list] | None = None  # activate's (global, group) parameters, found once per add_groups

    def add_groups(self, n_groups: int) -> None:
        for group in range(n_groups):
            for handle in self.peft_models:
                handle.add_adapter(group_adapter_name(group), handle.peft_config[GLOBAL_ADAPTER])
        self.n_groups = n_groups
        self.forget_adapter_keys()
        self._switched = None

    @torch.no_grad()
    def copy_global_to_groups(self) -> None:
        """With peft's own adapter state-dict helpers (they rename the adapter); a key they did not set is
        an error, not a silently random group adapter."""
        for handle in self.peft_models:
            state = get_peft_model_state_dict(handle, adapter_name=GLOBAL_ADAPTER, save_embedding_layers=False)
            for group in range(self.n_groups):
                name = group_adapter_name(group)
                result = set_peft_model_state_dict(handle, state, adapter_name=name)
                missed = set(result.missing_keys) & set(named_adapter_parameters(handle, name))
                if missed:
                    raise RuntimeError(
                        f"peft did not copy the global {self.name} adapter into {name}: {sorted(missed)}"
                    )

    def group_parameters(self, group: int) -> list[nn.Parameter]:
        return list(self.adapter_parameters(group_adapter_name(group)).values())

    def activate(self, group: int | None) -> None:
        super().activate(group)
        name = GLOBAL_ADAPTER if group is None else group_adapter_name(group)
        for handle in self.peft_models:
            handle.set_adapter(name)  # this also flips requires_grad: set them back below
        if self._switched is None:
            # Found once: walking the foundation's modules for each adapter at every step (PerPEFT switches
            # adapter every batch) cost more than the switch itself.
            groups = [p for g in range(self.n_groups) for p in self.group_parameters(g)]
            self._switched = list(self.adapter_parameters(GLOBAL_ADAPTER).values()), groups
        frozen, trainable = self._switched
        for param in frozen:
            param.requires_grad_(False)
        for param in trainable:
            param.requires_grad_(True)

    # --- LargeGlobalPEFT ---------------------------------------------------------------------------------

    @classmethod
    def rank_keys(cls, config, peft_type: str) -> dict:
        """{key: value} of the rank ``r`` and its alpha, as the run will use them (peft's class
        defaults where neither the YAML nor the user set them); empty for a method without a rank."""
        kwargs, _ = cls.peft_kwargs(config, peft_type)
        fields = {f.name: f.default for f in dataclasses.fields(cls.config_class(peft_type))}
        if "r" not in fields:
            return {}
        return {key: kwargs.get(key, fields[key]) for key in ("r", *ALPHA_KEYS) if key in fields}

    @classmethod
    def scaled(cls, config, factor: int) -> tuple[dict, dict]:
        """``r`` (and alpha with it: the update scale alpha / r stays the base model's) times ``factor``."""
        peft_type = str(config["peft_type"]).upper()
        ranks = cls.rank_keys(config, peft_type)
        if not ranks:
            return super().scaled(config, factor)
        scaled = {key: (value, value * factor) for key, value in ranks.items()}
        kwargs, _ = cls.peft_kwargs(config, peft_type)
        return {"peft_config": {**kwargs, **{k: new for k, (_, new) in scaled.items()}}}, scaled

    def base_parameter_count(self, base_config, factor: int) -> int:
        own = super().base_parameter_count(base_config, factor)
        return own // factor if self.rank_keys(base_config, self.name) else own  # linear in r
