"""Trainable modules attached to the frozen foundation model."""

from recbole_perpeft.adapters.moda import MoDAConfig, MoDALinear, is_moda, set_condition
from recbole_perpeft.adapters.peft_adapter import attach_peft, build_peft_config

__all__ = ["MoDAConfig", "MoDALinear", "attach_peft", "build_peft_config", "is_moda", "set_condition"]
