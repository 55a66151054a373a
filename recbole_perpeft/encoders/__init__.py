"""Frozen foundation models by name (``foundation_model`` in YAML).

The built-in ones are imported on first lookup (each loads transformers / EfficientNet weights'
packages); another one registers with ``@register_foundation("name")`` on a FoundationModel subclass."""

from __future__ import annotations

import importlib

from recbole_perpeft.encoders.base import FoundationModel

DEFAULT_FOUNDATION = "text_image"
BUILTIN = {  # name -> "module:class", imported when first asked for
    "clip": "recbole_perpeft.encoders.clip:ClipFoundation",
    "text_image": "recbole_perpeft.encoders.text_image:TextImageFoundation",
}
FOUNDATIONS: dict[str, type[FoundationModel]] = {}


def register_foundation(name: str):
    """Class decorator: make ``cls`` the foundation model called ``name``."""

    def register(cls: type[FoundationModel]) -> type[FoundationModel]:
        if not (isinstance(cls, type) and issubclass(cls, FoundationModel)):
            raise TypeError(f"register_foundation({name!r}): {cls!r} is not a FoundationModel subclass.")
        known = FOUNDATIONS.get(name) or (None if name not in BUILTIN else BUILTIN[name])
        if known is not None and known is not cls and known != f"{cls.__module__}:{cls.__qualname__}":
            raise ValueError(f"Foundation model {name!r} is already registered ({known}).")
        FOUNDATIONS[name] = cls
        return cls

    return register


def get_foundation(name: str) -> type[FoundationModel]:
    if name not in FOUNDATIONS and name in BUILTIN:
        module, cls = BUILTIN[name].split(":")
        FOUNDATIONS[name] = getattr(importlib.import_module(module), cls)
    if name not in FOUNDATIONS:
        known = sorted(set(BUILTIN) | set(FOUNDATIONS))
        raise ValueError(f"foundation_model must be one of {', '.join(map(repr, known))}, got {name!r}.")
    return FOUNDATIONS[name]


def build_foundation(config) -> FoundationModel:
    name = config["foundation_model"] if "foundation_model" in config else None
    return get_foundation(DEFAULT_FOUNDATION if name is None else name)(config)


__all__ = ["FoundationModel", "build_foundation", "get_foundation", "register_foundation"]
