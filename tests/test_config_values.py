"""The shared single-value checks (config_values): what a refused value's message names."""

from __future__ import annotations

import pytest

from recbole_perpeft.adapters import registry
from recbole_perpeft.config_values import choice, option, positive_int


def test_choice_returns_an_allowed_value_and_names_key_choices_raw_value_and_hint():
    assert choice("last", ("all", "last"), "loss_positions") == "last"
    with pytest.raises(ValueError) as err:
        choice("every", ("all", "last"), "loss_positions", "(properties/model/GlobalPEFT.yaml)", given="Every")
    assert str(err.value) == ("loss_positions must be one of all, last, got 'Every' "
                              "(properties/model/GlobalPEFT.yaml).")  # fmt: skip
    with pytest.raises(ValueError, match=r"^--table must be one of 2, 3, got '4'\.$"):
        choice("4", ("2", "3"), "--table")


def test_option_and_positive_int_keep_their_contract_and_the_registry_re_exports_them():
    assert option({"k": None}, "k", 3) == 3 and option({"k": 0}, "k", 3) == 0 and option({}, "k") is None
    assert positive_int(2, "n") == 2
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="n must be a positive integer"):
            positive_int(bad, "n")
    assert registry.option is option and registry.positive_int is positive_int
