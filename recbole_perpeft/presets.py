"""Presets (``--preset=NAME``): a layer of config keys chosen as a whole, ``properties/preset/<NAME>.yaml``.

``recbole`` (the default) adds nothing: RecBole's protocol with this project's defaults. ``paper`` sets the
official PerPEFT code's values where ours differ (docs/paper-preset.md). Keys for one adapter family only
go under ``for_peft_type: {<PEFT TYPE>: {...}}`` in the preset's file, applied when the run uses that type
(the paper's LoRA dropout would be an error in IA3's config).

Config layers a preset over the model, backbone and adapter files and under the dataset's file, the user's
files and the command line: keys the preset sets win over the adapter family's YAML (adapters/registry.py
asks :func:`set_by_preset`), and a mapping it sets (``peft_config``) is merged key by key with the user's."""

from __future__ import annotations

from collections.abc import Callable

import yaml

from recbole_perpeft.property_files import PROPERTIES_DIR

PRESET_DIR = PROPERTIES_DIR / "preset"
DEFAULT_PRESET = "recbole"
PER_PEFT_TYPE = "for_peft_type"  # {PEFT TYPE: {key: value}} inside a preset's file


def preset_names() -> list[str]:
    return sorted(path.stem for path in PRESET_DIR.glob("*.yaml"))


def preset_keys(name, peft_type=None, load: Callable[[str], object] = yaml.safe_load) -> dict:
    """The keys preset ``name`` (None: the default) sets for a run with ``peft_type``; ValueError naming the
    presets there are for an unknown name, or naming the file when it is not a mapping. ``load`` parses
    YAML text (Config passes RecBole's loader, which reads 1e-6 as a number)."""
    name = DEFAULT_PRESET if name is None else name
    names = preset_names()
    if not isinstance(name, str) or name not in names:
        raise ValueError(f"preset must be one of {', '.join(names)}, got {name!r} (--preset=paper: the official "
                         f"PerPEFT code's protocol; recbole: RecBole's, the default; docs/paper-preset.md).")
    path = PRESET_DIR / f"{name}.yaml"
    keys = load(path.read_text(encoding="utf-8")) or {}
    per_type = (keys.pop(PER_PEFT_TYPE, None) or {}) if isinstance(keys, dict) else None
    if not isinstance(keys, dict) or not isinstance(per_type, dict):
        raise ValueError(f"{path} must hold `key: value` lines (and {PER_PEFT_TYPE}: {{PEFT TYPE: {{key: value}}}}).")
    if peft_type is not None:
        keys.update(per_type.get(str(peft_type).upper()) or {})
    return keys


def set_by_preset(config, key: str) -> bool:
    """Whether the run's preset set ``key`` (a Config records them; a plain dict has no preset layer)."""
    return key in getattr(config, "preset_keys", ())


def merge_preset_mappings(final: dict, internal: dict, external: dict, preset_keys) -> None:
    """A mapping the preset set and the user set too is the preset's with the user's keys over it."""
    for key in preset_keys:
        if isinstance(internal.get(key), dict) and isinstance(external.get(key), dict):
            final[key] = {**internal[key], **external[key]}
