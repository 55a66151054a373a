"""Frozen foundation models, selected by ``foundation_model`` in YAML."""

from recbole_perpeft.encoders.base import FoundationModel


def build_foundation(config) -> FoundationModel:
    name = config["foundation_model"] or "text_image"
    if name == "clip":
        from recbole_perpeft.encoders.clip import ClipFoundation

        return ClipFoundation(config)
    if name == "text_image":
        from recbole_perpeft.encoders.text_image import TextImageFoundation

        return TextImageFoundation(config)
    raise ValueError(f"foundation_model must be 'clip' or 'text_image', got {name!r}.")


__all__ = ["FoundationModel", "build_foundation"]
