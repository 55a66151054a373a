"""HF peft methods on the foundation model, configured in YAML.

``peft_type`` is any peft ``PeftType`` name (LORA, IA3, LOHA, ...) and ``peft_config`` the keyword
arguments of its config class. Target modules default per backbone (below, from the paper); for
other types peft's own per-architecture defaults apply, so a new peft method needs no code. MODA is our
own LoRA variant (``moda.py``), built through peft's custom-layer API."""

from __future__ import annotations

from peft import PEFT_TYPE_TO_CONFIG_MAPPING, get_peft_model

from recbole_perpeft.adapters.moda import MoDAConfig
from recbole_perpeft.adapters.side_network import SIDE_PEFT_TYPES

# peft's methods plus ours; MoDAConfig is a LoraConfig, so peft itself knows it as LORA.
CONFIG_CLASSES = {**PEFT_TYPE_TO_CONFIG_MAPPING, "MODA": MoDAConfig}

# Paper: LoRA on the query/value projections, (IA)3 on key, value and the first feed-forward layer.
DEFAULT_TARGETS = {
    "LORA": {
        "bert": {"target_modules": ["query", "value"]},
        "clip": {"target_modules": ["q_proj", "v_proj"]},
    },
    "IA3": {
        "bert": {
            "target_modules": ["key", "value", "intermediate.dense"],
            "feedforward_modules": ["intermediate.dense"],
        },
        "clip": {"target_modules": ["k_proj", "v_proj", "fc1"], "feedforward_modules": ["fc1"]},
    },
}
DEFAULT_TARGETS["MODA"] = DEFAULT_TARGETS["LORA"]  # MoDA replaces LoRA on the same layers


def build_peft_config(peft_type: str, model_type: str | None, overrides: dict | None = None):
    key = str(peft_type).upper()
    if key not in CONFIG_CLASSES:
        raise ValueError(
            f"peft_type '{peft_type}' is unknown; choose a side network ({', '.join(SIDE_PEFT_TYPES)}) or a peft "
            f"method ({', '.join(sorted(CONFIG_CLASSES))}), or use the FrozenMM model for none."
        )
    kwargs = dict(DEFAULT_TARGETS.get(key, {}).get(model_type, {}))
    kwargs.update(overrides or {})
    try:
        return CONFIG_CLASSES[key](**kwargs)
    except TypeError as err:
        raise ValueError(f"peft_config does not fit peft's {key} config: {err}") from err


def attach_peft(module, peft_type: str, overrides: dict | None = None, adapter_name: str = "default"):
    """Inject a peft method into ``module`` in place; return the ``PeftModel`` handle (used to add
    and switch named adapters). Only the adapter's parameters stay trainable."""
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    if model_type in ("clip_text_model", "clip_vision_model"):
        model_type = "clip"  # a single CLIP tower: same layer names
    peft_config = build_peft_config(peft_type, model_type, overrides)
    try:
        return get_peft_model(module, peft_config, adapter_name=adapter_name)
    except (ValueError, AssertionError, TypeError) as err:
        raise ValueError(
            f"peft could not attach {peft_type} to {type(module).__name__}: {err}. Set peft_config's "
            "target_modules to layers of this encoder."
        ) from err
