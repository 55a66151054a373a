"""What every command of ``recbole-perpeft`` shares: the ``--key=value`` config overrides (RecBole style), and
the one line an old entry point prints. A leaf module (it imports nothing of the package), so that the commands'
modules can import it without an import cycle through ``cli.py``, which dispatches to them."""

from __future__ import annotations

import sys

import yaml


def parse_overrides(parser, rest: list[str]) -> dict:
    """The ``--key=value`` config overrides left over by ``parser`` (every command line of the package)."""
    overrides = {}
    for arg in rest:
        key, sep, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if not key or not sep:
            parser.error(f"unrecognised argument '{arg}': config overrides are written --key=value")
        overrides[key] = flow_value(value)
    return overrides


def flow_value(value: str):
    """``{lora_dropout: 0.5}`` or ``[5, 10]`` (YAML flow syntax, as in a YAML file) -> dict / list;
    anything else stays a string for RecBole's own conversion (numbers, booleans, Python literals)."""
    if value[:1] in "{[":
        try:
            loaded = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        if isinstance(loaded, (dict, list)):
            return loaded
    return value


def deprecated_alias(old: str, new: str) -> None:
    """The one line an old entry point (``python -m ...``) prints before doing what it always did."""
    print(f"deprecated: '{old}' is now '{new}'; the old form goes in the next release.", file=sys.stderr)
