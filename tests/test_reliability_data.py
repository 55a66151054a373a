"""Issue 44, data side: no silent change of the data (time field type and precision, image modes), bounded
image decoding, and cache builds that survive a full disk and a stuck lock holder."""

from __future__ import annotations

from pathlib import Path

import pytest

from recbole_perpeft.config import Config
from recbole_perpeft.data import create_dataset, data_preparation
from tests.tiny import make_atomic_dataset, quick_config

NAME = "rel"
SMALL_TOPK = {"topk": [5], "valid_metric": "hit@5"}


def config_of(tmp_path: Path, keys: dict, **overrides) -> Config:
    merged = {**keys, **SMALL_TOPK, "state": "WARNING", **overrides}
    return Config(model="GlobalPEFT", dataset=NAME, config_dict=quick_config(tmp_path, **merged))


# --- the time field --------------------------------------------------------------------------------------


@pytest.mark.parametrize("declared", ["token", "token_seq", "float_seq"])
def test_a_time_field_not_declared_float_is_refused_with_file_and_header(tmp_path, declared):
    keys = make_atomic_dataset(tmp_path / "data", NAME, with_images=False)
    inter = tmp_path / "data" / NAME / f"{NAME}.inter"
    lines = inter.read_text().splitlines()
    inter.write_text("\n".join([lines[0].replace("timestamp:float", f"timestamp:{declared}"), *lines[1:]]) + "\n")
    with pytest.raises(ValueError) as err:
        create_dataset(config_of(tmp_path, keys))
    message = str(err.value)
    assert f"{NAME}.inter header declares the time field as timestamp:{declared}" in message
    assert str(inter) in message and "timestamp:float" in message


def test_a_time_field_left_out_of_load_col_is_not_checked(tmp_path):
    keys = make_atomic_dataset(tmp_path / "data", NAME, with_images=False)
    inter = tmp_path / "data" / NAME / f"{NAME}.inter"
    lines = inter.read_text().splitlines()
    inter.write_text("\n".join([lines[0].replace("timestamp:float", "timestamp:token"), *lines[1:]]) + "\n")
    keys["load_col"] = {"inter": ["user_id", "item_id"], "item": ["item_id", "title"]}
    dataset = create_dataset(config_of(tmp_path, keys))
    assert dataset.inter_num == len(lines) - 1


@pytest.mark.parametrize("base", [886324800, 1_700_000_000_000])  # Unix seconds, and milliseconds
def test_timestamps_closer_than_float32_steps_keep_their_order(tmp_path, base):
    """float32 holds Unix seconds in 64-second steps (and milliseconds in far coarser ones): a file not
    sorted by time must still give each user the last item by time as its test item."""
    keys = make_atomic_dataset(tmp_path / "data", NAME, with_images=False)
    inter = tmp_path / "data" / NAME / f"{NAME}.inter"
    header, *rows = inter.read_text().splitlines()
    by_user: dict[str, list[str]] = {}
    for row in rows:
        by_user.setdefault(row.split("\t")[0], []).append(row.split("\t")[1])
    out = [header]
    for user, items in by_user.items():
        # Times one apart, written newest first: only an exact time type can put them back in order.
        out += [f"{user}\t{item}\t{base + k}" for k, item in reversed(list(enumerate(items)))]
    inter.write_text("\n".join(out) + "\n")
    config = config_of(tmp_path, keys)
    dataset = create_dataset(config)
    _, _, test = data_preparation(config, dataset)
    tokens = dataset.field2id_token
    seen = 0
    for batch in test:
        interaction = batch[0]
        for user, target in zip(interaction["user_id"].tolist(), interaction["item_id"].tolist(), strict=True):
            assert tokens["item_id"][target] == by_user[tokens["user_id"][user]][-1]
            seen += 1
    assert seen == len(by_user)
