"""Registry of backbone recommenders (``backbone`` in YAML): the user side of the multimodal models.

A backbone registers itself with ``@register_backbone("Name")`` on its class; :func:`get_backbone`
imports the built-in ones (SASRec, LightGCN) on first lookup, so importing this package stays cheap
and free of import cycles (the backbones import the data loaders, which import RecBole).

Each backbone's hyper-parameters live in ``recbole_perpeft/properties/backbone/<Name>.yaml``;
:func:`backbone_setting` reads a key from the run's config and falls back to that file, so a backbone
works whether or not the Config merged its YAML."""

from __future__ import annotations

import functools
import importlib
from pathlib import Path

import yaml

from recbole_perpeft.model.backbones.base import Backbone, Triples

__all__ = [
    "BACKBONES", "DEFAULT_BACKBONE", "Backbone", "Triples", "backbone_defaults", "backbone_setting",
    "build_backbone", "get_backbone", "register_backbone",
]  # fmt: skip

BACKBONES: dict[str, type[Backbone]] = {}
DEFAULT_BACKBONE = "SASRec"  # what every model used before backbones existed (``backbone: ~``)
BUILTIN_MODULES = ("recbole_perpeft.model.backbones.sasrec", "recbole_perpeft.model.backbones.lightgcn")
BACKBONE_PROPERTIES = Path(__file__).resolve().parents[2] / "properties" / "backbone"


def register_backbone(name: str):
    """Class decorator: make ``cls`` the backbone called ``name`` (and set ``cls.name``)."""

    def register(cls: type[Backbone]) -> type[Backbone]:
        if not (isinstance(cls, type) and issubclass(cls, Backbone)):
            raise TypeError(f"register_backbone({name!r}): {cls!r} is not a Backbone subclass.")
        known = BACKBONES.get(name)
        # The same class registered again (a module reloaded) is fine; a second class under one name is not.
        if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"Backbone {name!r} is already registered by {known.__module__}.{known.__qualname__}.")
        cls.name = name
        BACKBONES[name] = cls
        return cls

    return register


def _import_builtins() -> None:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)


def get_backbone(name: str | None) -> type[Backbone]:
    """The backbone class called ``name`` (``None``: :data:`DEFAULT_BACKBONE`); case-insensitive when the
    exact name is unknown. ValueError naming the known backbones otherwise."""
    name = DEFAULT_BACKBONE if name is None else str(name)
    if name not in BACKBONES:
        _import_builtins()
    if name in BACKBONES:
        return BACKBONES[name]
    by_lower = {known.lower(): known for known in BACKBONES}
    if name.lower() in by_lower:
        return BACKBONES[by_lower[name.lower()]]
    raise ValueError(f"Unknown backbone {name!r}: known backbones are {', '.join(sorted(BACKBONES))}.")


def build_backbone(config, dataset) -> Backbone:
    """The run's backbone (``config["backbone"]``) over the training split ``dataset``."""
    return get_backbone(config["backbone"])(config, dataset)


@functools.cache
def _defaults(name: str) -> dict:
    path = BACKBONE_PROPERTIES / f"{name}.yaml"
    loaded = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    return loaded if isinstance(loaded, dict) else {}


def backbone_defaults(name: str) -> dict:
    """The keys of ``properties/backbone/<name>.yaml`` (a copy: callers may change it)."""
    return dict(_defaults(name))


def backbone_setting(config, name: str, key: str):
    """``config[key]`` when the run's config holds the key (even as ``~``), else the default of backbone
    ``name``'s property file (None if that file lacks it too)."""
    if key in config:
        return config[key]
    return _defaults(name).get(key)
