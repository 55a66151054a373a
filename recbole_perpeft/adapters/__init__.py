"""Trainable modules attached to the frozen foundation model."""

from recbole_perpeft.adapters.peft_adapter import attach_peft, build_peft_config

__all__ = ["attach_peft", "build_peft_config"]
