"""Reading and checking single config values, shared by every layer (data, adapters, models, reproduce).

Kept free of heavy imports (no torch, peft or RecBole), so a data module can check a key without pulling
in the adapter registry. ``adapters.registry`` re-exports :func:`option` and :func:`positive_int`."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["NUMERIC_KEYS", "Number", "choice", "option", "positive_int"]


def option(config, key: str, default=None):
    """``config[key]``, or ``default`` when the config lacks the key or holds ``~`` there (never for a
    0 or False: those are values). Works on RecBole Configs and plain dicts."""
    value = config[key] if key in config else None
    return default if value is None else value


def positive_int(value, key: str) -> int:
    """``value``, refused unless a positive int (a 0 is a mistake to report, not "use the default")."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a positive integer, got {value!r}.")
    return value


def choice(value, choices: Iterable[str], key: str, hint: str = "", given=None) -> str:
    """``value`` if it is one of ``choices``, else a ValueError naming ``key``, the allowed values, what was
    given (``given``, default ``value``: pass the raw value when ``value`` is normalised) and ``hint``
    (where the key is set, what each value means)."""
    choices = list(choices)
    if value not in choices:
        raw = value if given is None else given
        allowed = ", ".join(map(str, choices))
        raise ValueError(f"{key} must be one of {allowed}, got {raw!r}{' ' + hint if hint else ''}.")
    return value


# --- declared types and ranges of the numeric keys -----------------------------------------------------------


@dataclass(frozen=True)
class Number:
    """A numeric key's declared type and range: ``kind`` int or float (an int is a float too; an integral
    float such as 1e3 is an int), ``low`` / ``high`` bounds (``open_low``: ``low`` itself excluded),
    ``none_ok``: ``~`` is a value (the key's "unset"). Always finite: nan and inf are refused."""

    kind: type = float
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    none_ok: bool = False

    def describe(self) -> str:
        unset = " (or ~)" if self.none_ok else ""
        if self.kind is int and self.high is None and self.low in (0, 1) and not self.open_low:
            return ("a non-negative integer" if self.low == 0 else "a positive integer") + unset
        noun = "an integer" if self.kind is int else "a number"
        low, high = (_plain_number(b) for b in (self.low, self.high))
        if self.low is not None and self.high is not None:
            bounds = f" in {'(' if self.open_low else '['}{low}, {high}]"
        elif self.low is not None:
            bounds = f" {'above' if self.open_low else 'of at least'} {low}"
        else:
            bounds = ""
        return noun + bounds + unset

    def check(self, key: str, value):
        """``value`` (an integral float as an int for an int key), or a ValueError naming the key, what it
        must be and what was given."""
        if value is None and self.none_ok:
            return None
        number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        if number is not None and self.kind is int and isinstance(number, float):
            number = int(number) if math.isfinite(number) and number.is_integer() else None
        in_range = number is not None and math.isfinite(number) and (
            self.low is None or (number > self.low if self.open_low else number >= self.low)
        ) and (self.high is None or number <= self.high)  # fmt: skip
        if not in_range:
            raise ValueError(f"{key} must be {self.describe()}, got {value!r}: give --{key} (or {key}: in a YAML "
                             "file) such a value.")
        return number


def _plain_number(bound) -> str:
    return "" if bound is None else str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


INT, POSITIVE_INT, FRACTION = Number(int, 0), Number(int, 1), Number(float, 0, 1)
# Every numeric key a run reads that a mistake could set to a non-number or out of range (RecBole's and ours).
# A key not listed here whose default is a number is still checked to be a finite number (config.py).
NUMERIC_KEYS = {
    "seed": Number(int, 0, 2**32 - 1),  # numpy's seed range
    "epochs": POSITIVE_INT,
    "stage1_epochs": INT,
    "stage2_epochs": INT,
    "train_batch_size": POSITIVE_INT,
    "eval_batch_size": POSITIVE_INT,
    "learning_rate": Number(float, 0, open_low=True),
    "adapter_learning_rate": Number(float, 0, open_low=True, none_ok=True),
    "weight_decay": Number(float, 0),
    "eval_step": INT,
    "stopping_step": INT,
    "MAX_ITEM_LIST_LENGTH": POSITIVE_INT,
    "user_sample_ratio": Number(float, 0, 1, open_low=True, none_ok=True),
    "n_groups": Number(int, 1, none_ok=True),
    "hidden_size": POSITIVE_INT,
    "inner_size": POSITIVE_INT,
    "n_layers": POSITIVE_INT,
    "n_heads": POSITIVE_INT,
    "hidden_dropout_prob": FRACTION,
    "attn_dropout_prob": FRACTION,
    "projector_dropout": FRACTION,
    "layer_norm_eps": Number(float, 0, open_low=True),
    "initializer_range": Number(float, 0),
    "missing_image_ratio": FRACTION,
    "text_max_length": POSITIVE_INT,
    "image_size": POSITIVE_INT,
    "sampled_softmax_negatives": POSITIVE_INT,
    "cmsa_weight": Number(float, 0),
    "item_id_norm_penalty": Number(float, 0),
    "multimodal_weight": Number(float, 0),
    "cmsa_dim": POSITIVE_INT,
    "cmsa_temperature": Number(float, 0, open_low=True),
    "worker": INT,
    "metric_decimal_place": INT,
    "loss_decimal_place": INT,
}
