"""Adapter families: the trainable part beside or inside the frozen foundation model, by ``peft_type``.

``registry`` (names, defaults) and ``base`` (the :class:`AdapterFamily` interface) come first; every
family module imports them, never another family's module (``moda`` extends ``peft_adapter``)."""

from recbole_perpeft.adapters.base import AdapterFamily, ModuleFamily
from recbole_perpeft.adapters.moda import MoDAConfig, MoDALinear, is_moda, set_condition
from recbole_perpeft.adapters.peft_adapter import PeftFamily, attach_peft, build_peft_config
from recbole_perpeft.adapters.registry import (
    family_defaults,
    family_settings,
    get_adapter_family,
    register_adapter_family,
)

__all__ = [
    "AdapterFamily", "MoDAConfig", "MoDALinear", "ModuleFamily", "PeftFamily", "attach_peft", "build_peft_config",
    "family_defaults", "family_settings", "get_adapter_family", "is_moda", "register_adapter_family",
    "set_condition",
]  # fmt: skip
