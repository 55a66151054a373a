"""Adapter families by name (``peft_type``), and their defaults (``properties/adapter/<NAME>.yaml``).

A family registers itself with ``@register_adapter_family("NAME")`` on its class; :func:`get_adapter_family`
imports the built-in families on first lookup, so importing this module stays cheap and no family
module needs to import another (they all import this one, never the reverse).

A family's YAML holds config keys with their defaults (e.g. IISAN.yaml: ``side_adapter_size: 32``).
:func:`family_settings` reads them for a run; the Config does not merge these files, so the precedence
is applied here: property files (overall, model, dataset YAMLs) < the family's YAML < a preset's keys
(presets.py) < the user's files,
``config_dict`` and command line; mappings (``peft_config``) merge key by key; a ``~`` falls back to
the family default (which may itself be ``~``, meaning "derive it", e.g. ``side_width``)."""

from __future__ import annotations

import functools
import importlib
from pathlib import Path

import yaml
from peft import PEFT_TYPE_TO_CONFIG_MAPPING

from recbole_perpeft.config_values import option, positive_int
from recbole_perpeft.presets import set_by_preset

__all__ = [
    "ADAPTER_FAMILIES", "FROZEN", "adapter_family_names", "family_defaults", "family_settings",
    "get_adapter_family", "option", "positive_int", "register_adapter_family",
]  # fmt: skip

ADAPTER_FAMILIES: dict[str, type] = {}
FROZEN = "FROZEN"  # the family of a model that does not adapt the foundation (FrozenMM)
ADAPTER_PROPERTIES = Path(__file__).resolve().parents[1] / "properties" / "adapter"
BUILTIN_MODULES = tuple(
    f"recbole_perpeft.adapters.{name}" for name in ("frozen", "peft_adapter", "moda", "iisan", "crossan")
)
_DEFAULTS_GIVEN: dict[str, dict | Path] = {}  # defaults passed to the decorator instead of a packaged YAML
_builtins_loaded = False


def _key(name) -> str:
    return str(getattr(name, "value", name)).upper()  # peft's PeftType members are str enums


def register_adapter_family(*names: str, defaults: dict | str | Path | None = None):
    """Class decorator: make ``cls`` the adapter family for ``peft_type`` ``names`` (case-insensitive).

    ``defaults``: the family's default config keys, as a mapping or a YAML file; by default
    ``properties/adapter/<NAME>.yaml`` (none: no defaults). ``cls.name`` is set to the first name."""
    if not names:
        raise TypeError("register_adapter_family needs at least one name.")

    def register(cls: type) -> type:
        if cls.__module__ not in BUILTIN_MODULES:  # a built-in's name taken first would fail its import later
            _load_builtins()
        for name in map(_key, names):
            known = ADAPTER_FAMILIES.get(name)
            # The same class again (a module reloaded) is fine; another class under a taken name is not.
            if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
                raise ValueError(f"Adapter family {name!r} is already registered by {known.__module__}."
                                 f"{known.__qualname__}.")  # fmt: skip
            ADAPTER_FAMILIES[name] = cls
            if defaults is not None:
                _DEFAULTS_GIVEN[name] = defaults if isinstance(defaults, dict) else Path(defaults)
                _yaml_defaults.cache_clear()
        if "name" not in cls.__dict__:
            cls.name = _key(names[0])
        return cls

    return register


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True  # first: the built-in modules register (and so call back here) on import
    for module in BUILTIN_MODULES:
        importlib.import_module(module)


def adapter_family_names() -> tuple[list[str], list[str]]:
    """(our adapter families, peft's methods), each sorted."""
    _load_builtins()
    peft_methods = {_key(name) for name in PEFT_TYPE_TO_CONFIG_MAPPING}
    return sorted(set(ADAPTER_FAMILIES) - peft_methods), sorted(set(ADAPTER_FAMILIES) & peft_methods)


def get_adapter_family(peft_type) -> type:
    """The family class for ``peft_type``; ValueError listing every known name otherwise."""
    _load_builtins()
    family = ADAPTER_FAMILIES.get(_key(peft_type)) if peft_type is not None else None
    if family is None:
        ours, peft_methods = adapter_family_names()
        raise ValueError(
            f"peft_type {str(peft_type)!r} is unknown; choose an adapter family ({', '.join(ours)}) or a peft "
            f"method ({', '.join(peft_methods)}), or use the FrozenMM model for none."
        )
    return family


@functools.cache
def _yaml_defaults(name: str) -> dict:
    given = _DEFAULTS_GIVEN.get(name, ADAPTER_PROPERTIES / f"{name}.yaml")
    if isinstance(given, dict):
        return given
    if not given.is_file():
        return {}  # e.g. a peft method without a file: peft's own defaults apply
    loaded = yaml.safe_load(given.read_text(encoding="utf-8"))
    if loaded is not None and not isinstance(loaded, dict):
        raise ValueError(f"{given} must hold `key: value` lines, not a {type(loaded).__name__}.")
    return loaded or {}


def family_defaults(name: str) -> dict:
    """The default config keys of family ``name`` (a deep copy: callers may change it)."""
    return yaml.safe_load(yaml.safe_dump(_yaml_defaults(_key(name))))  # cheap deep copy of plain data


def _from_property_file(config, key: str) -> bool:
    """Whether the run's value of ``key`` is only a property file's default: not given by the user
    (files, config_dict, command line) and not changed since (e.g. by LargeGlobalPEFT's scaling)."""
    internal, external = getattr(config, "internal_config_dict", None), getattr(config, "external_config_dict", None)
    if internal is None or external is None:  # a plain dict: everything in it was asked for
        return False
    if set_by_preset(config, key):  # a preset's layer sits over the adapter files (presets.py)
        return False
    return key not in external and key in internal and config[key] == internal[key]


def family_settings(name: str, config) -> dict:
    """Every key of family ``name``'s defaults, resolved for the run (see the module docstring)."""
    settings = family_defaults(name)
    for key, default in settings.items():
        if key not in config or (_from_property_file(config, key) and not isinstance(default, dict)):
            continue
        value = config[key]
        if isinstance(default, dict) and isinstance(value, dict):
            settings[key] = {**default, **value}
        elif value is not None:
            settings[key] = value
    return settings
