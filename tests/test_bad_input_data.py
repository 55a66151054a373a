"""Bad input data: one clear error line (file, line, field or value, what to do) or, where loading goes on,
one warning with counts and what was done; never a library traceback or a silent change of the data."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from recbole_perpeft.config import Config
from recbole_perpeft.data import ItemModalityStore, create_dataset, data_preparation
from tests.tiny import make_atomic_dataset, quick_config

NAME = "bad"
SMALL_TOPK = {"topk": [5], "valid_metric": "hit@5"}  # the tiny dataset has 25 items, fewer than overall.yaml's 30


class Data:
    """A tiny atomic dataset (30 users, 25 items '101'..'125', all kept by 5-core) to break."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.keys = make_atomic_dataset(tmp_path / "data", NAME, with_images=False)
        self.folder = tmp_path / "data" / NAME
        self.inter, self.item = self.folder / f"{NAME}.inter", self.folder / f"{NAME}.item"

    def lines(self, path: Path) -> list[str]:
        return path.read_text().splitlines()

    def write(self, path: Path, lines: list[str]) -> None:
        path.write_text("\n".join(lines) + "\n")

    def config(self, **overrides) -> Config:
        keys = {**self.keys, **SMALL_TOPK, "state": "WARNING", **overrides}
        return Config(model="GlobalPEFT", dataset=NAME, config_dict=quick_config(self.tmp_path, **keys))

    def dataset(self, **overrides):
        return create_dataset(self.config(**overrides))

    def prepare(self, **overrides):
        config = self.config(**overrides)
        return data_preparation(config, create_dataset(config))


@pytest.fixture
def data(tmp_path) -> Data:
    return Data(tmp_path)


def rows_of(dataset) -> dict[str, int]:
    return {token: i for i, token in enumerate(dataset.field2id_token["item_id"])}


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# --- 1. items of the .inter that the .item lacks ---------------------------------------------------------

MISSING = ("103", "110", "117")


def drop_items(data: Data, tokens=MISSING) -> None:
    data.write(data.item, [line for line in data.lines(data.item) if line.split("\t")[0] not in tokens])


def test_items_missing_from_item_file_keep_their_interactions(data, caplog):
    n_lines = len(data.lines(data.inter)) - 1
    drop_items(data)
    config = data.config()
    with caplog.at_level(logging.WARNING):
        dataset = create_dataset(config)
    assert dataset.inter_num == n_lines  # RecBole would drop every interaction with the 3 items
    assert dataset.item_num - 1 == 25
    (warning,) = [w for w in warnings_of(caplog) if "missing from" in w]
    assert warning.startswith(f"3 items of {NAME}.inter are missing from {NAME}.item (")
    assert "kept, without text (a learned placeholder)" in warning

    rows, texts, paths = rows_of(dataset), dataset.item_texts(), dataset.item_image_paths()
    for token in MISSING:
        assert texts[rows[token]] == ""
        assert paths[rows[token]] == os.path.join(data.keys["image_dir"], f"{token}.jpg")  # image_dir as usual
    assert all(texts[rows[t]] for t in rows if t not in MISSING and t != "[PAD]")
    has_text = ItemModalityStore(config, dataset).has_text
    assert [t for t, i in rows.items() if i and not has_text[i]] == sorted(MISSING)

    data_preparation(config, dataset)  # build(): item_feat becomes an Interaction
    assert [dataset.item_texts()[rows[t]] for t in MISSING] == ["", "", ""]


def test_items_missing_from_item_file_have_no_image_path_from_image_field(data, caplog):
    lines = ["item_id:token\ttitle:token_seq\timage:token"]
    lines += [f"{line}\timages/{line.split(chr(9))[0]}.jpg" for line in data.lines(data.item)[1:]]
    data.write(data.item, lines)
    drop_items(data)
    load_col = {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title", "image"]}
    with caplog.at_level(logging.WARNING):
        dataset = data.dataset(load_col=load_col, image_field="image")
    assert "kept, without text or image (learned placeholders)" in caplog.text
    rows, paths = rows_of(dataset), dataset.item_image_paths()
    assert [paths[rows[t]] for t in MISSING] == [None, None, None]
    assert paths[rows["101"]] == os.path.join(str(data.folder), "images/101.jpg")


def test_explicit_filter_inter_by_user_or_item_drops_them_and_says_so(data, caplog):
    n_lines = len(data.lines(data.inter)) - 1
    with_missing = sum(line.split("\t")[1] in MISSING for line in data.lines(data.inter)[1:])
    drop_items(data)
    with caplog.at_level(logging.WARNING):
        dataset = data.dataset(filter_inter_by_user_or_item=True, user_inter_num_interval=None)
    assert dataset.inter_num == n_lines - with_missing
    assert not set(MISSING) & set(dataset.field2id_token["item_id"])
    assert "their interactions are dropped (filter_inter_by_user_or_item: True)" in caplog.text


def test_item_file_with_none_of_the_items_is_refused(data):
    data.write(data.item, ["item_id:token\ttitle:token_seq", "999\tsomething else", "998\tanother"])
    pattern = (
        rf"none of the 25 items of {NAME}\.inter \(e\.g\. .*\) is in {NAME}\.item \(2 items, e\.g\. '999', '998'\)"
    )
    with pytest.raises(ValueError, match=pattern):
        data.dataset()


def test_repeated_item_rows_are_reported(data, caplog):
    lines = data.lines(data.item)
    data.write(data.item, [*lines, "105\ta different title"])
    with caplog.at_level(logging.WARNING):
        dataset = data.dataset()
    assert f"{NAME}.item lists 1 item more than once (first repeat: line {len(lines) + 1}): the first" in caplog.text
    assert dataset.item_texts()[rows_of(dataset)["105"]] != "a different title"


# --- 2. duplicated interactions, lines with more or fewer fields --------------------------------------------


def test_duplicated_interactions_are_kept_with_a_warning(data, caplog):
    lines = data.lines(data.inter)
    data.write(data.inter, [*lines, lines[3], lines[1]])
    with caplog.at_level(logging.WARNING):
        dataset = data.dataset()
    assert dataset.inter_num == len(lines) - 1 + 2
    assert (
        f"{NAME}.inter has 2 duplicated interactions (same user, item and timestamp as an earlier line; first: "
        f"line {len(lines) + 1}): kept, as RecBole does (set rm_dup_inter: first" in caplog.text
    )


def test_line_numbers_count_blank_lines_and_survive_user_sampling(data, caplog):
    no_k_core = {"user_inter_num_interval": None, "item_inter_num_interval": None}
    kept = set(data.dataset(user_sample_ratio=0.5, **no_k_core).field2id_token["user_id"][1:])
    lines = data.lines(data.inter)
    duplicate = next(line for line in lines[1:] if line.split("\t")[0] in kept and line.split("\t")[0] != "u1")
    lines[3:3] = ["", "   "]  # blank lines: pandas skips them, the reported line numbers do not
    data.write(data.inter, [*lines, duplicate, f"{duplicate.split(chr(9))[0]}\t\t5"])
    with caplog.at_level(logging.WARNING):
        data.dataset(user_sample_ratio=0.5, **no_k_core)  # drops half the users' lines before the check
    assert f"first: line {len(lines) + 1}): kept" in caplog.text
    assert f"1 interaction without item_id (first: line {len(lines) + 2}): dropped." in caplog.text


def test_duplicated_interactions_with_rm_dup_inter(data, caplog):
    lines = data.lines(data.inter)
    data.write(data.inter, [*lines, lines[3], lines[1]])
    with caplog.at_level(logging.INFO):
        dataset = data.dataset(rm_dup_inter="first")
    assert dataset.inter_num == len(lines) - 1
    assert "2 duplicated interactions" in caplog.text and "dropped by rm_dup_inter=first" in caplog.text
    assert f"rm_dup_inter=first: dropped 2 repeated user-item interactions of {NAME}.inter" in caplog.text


@pytest.mark.parametrize("line", [1, 4])  # on the first data line pandas would shift every column by one
def test_more_fields_than_the_header_is_refused(data, line):
    lines = data.lines(data.inter)
    lines[line] += "\tEXTRA"
    lines[9] += "\tEXTRA\tMORE"
    data.write(data.inter, lines)
    pattern = rf"{NAME}\.inter line {line + 1} has more tab-separated fields than its header's 3 \(2 such lines; "
    with pytest.raises(ValueError, match=pattern) as err:
        data.dataset()
    assert str(data.inter) in str(err.value) and "remove the extra fields" in str(err.value)


def test_more_fields_in_the_item_file_is_refused(data):
    lines = data.lines(data.item)
    lines[6] += "\textra words"  # a tab inside a title
    data.write(data.item, lines)
    with pytest.raises(ValueError, match=rf"{NAME}\.item line 7 has more tab-separated fields than its header's 2"):
        data.dataset()


def test_fewer_fields_in_the_inter_file_is_refused(data):
    lines = data.lines(data.inter)
    lines[5] = "\t".join(lines[5].split("\t")[:2])
    data.write(data.inter, lines)
    with pytest.raises(ValueError, match=rf"{NAME}\.inter line 6 has fewer tab-separated fields than its header's 3"):
        data.dataset()


def test_fewer_fields_in_the_item_file_is_a_missing_title(data):
    lines = data.lines(data.item)
    lines[2] = lines[2].split("\t")[0]  # item '102' without its (trailing) title field
    data.write(data.item, lines)
    dataset = data.dataset()
    assert dataset.item_texts()[rows_of(dataset)["102"]] == ""


def test_unclosed_quote_is_refused_with_its_line(data):
    lines = data.lines(data.item)
    lines[4] = lines[4].split("\t")[0] + '\t"the lost title'
    data.write(data.item, lines)
    with pytest.raises(ValueError, match=rf"{NAME}\.item line 5: a field that starts with a double quote"):
        data.dataset()


def test_quoted_fields_are_read_as_pandas_reads_them(data):
    lines = data.lines(data.item)
    lines[4] = lines[4].split("\t")[0] + '\t"""Quoted"" title\twith a tab"'  # one field: csv quoting
    data.write(data.item, lines)
    dataset = data.dataset()
    assert dataset.item_texts()[rows_of(dataset)["104"]] == '"Quoted" title\twith a tab'


def test_undecodable_file_is_refused(data):
    data.item.write_bytes(data.item.read_bytes() + "126\tcaf\xe9 cr\xe8me\n".encode("latin-1"))
    with pytest.raises(
        ValueError, match=rf"^{NAME}\.item line 27 is not valid \S+ text \(.*\): re-save the file as UTF-8"
    ):
        data.dataset()


# --- 3. values ----------------------------------------------------------------------------------------------


def test_non_numeric_timestamp_names_file_line_field_and_value(data):
    lines = data.lines(data.inter)
    for row, value in ((6, "yesterday"), (20, "12:00")):
        user, item, _ = lines[row].split("\t")
        lines[row] = f"{user}\t{item}\t{value}"
    data.write(data.inter, lines)
    pattern = (
        rf"^{NAME}\.inter line 7: timestamp 'yesterday' is not a number, but the header declares timestamp:float "
        r"\(2 such lines; "
    )
    with pytest.raises(ValueError, match=pattern):
        data.dataset()


def test_empty_timestamp_is_refused(data):
    lines = data.lines(data.inter)
    lines[3] = lines[3].rsplit("\t", 1)[0] + "\t"
    data.write(data.inter, lines)
    with pytest.raises(ValueError, match=rf"{NAME}\.inter line 4 has no timestamp \(1 such line; "):
        data.dataset()


def test_interaction_without_item_id_is_dropped_with_one_warning(data, caplog):
    lines = data.lines(data.inter)
    user, _, time = lines[8].split("\t")
    data.write(data.inter, [*lines, f"{user}\t\t{time}"])
    with caplog.at_level(logging.WARNING):
        dataset = data.dataset()
    assert dataset.inter_num == len(lines) - 1
    assert f"{NAME}.inter: 1 interaction without item_id (first: line {len(lines) + 1}): dropped." in caplog.text


# --- headers ------------------------------------------------------------------------------------------------


def test_unknown_type_in_header(data):
    lines = data.lines(data.inter)
    lines[0] = "user_id:token\titem_id:token\ttimestamp:flaot"
    data.write(data.inter, lines)
    with pytest.raises(ValueError, match=rf"{NAME}\.inter header: column 'timestamp' has type 'flaot', not one of"):
        data.dataset()


def test_header_without_the_item_column(data):
    lines = data.lines(data.inter)
    lines[0] = "user_id:token\tproduct:token\ttimestamp:float"
    data.write(data.inter, lines)
    with pytest.raises(ValueError, match=rf"{NAME}\.inter has no column 'item_id' \(its header: user_id:token, "):
        data.dataset()


# --- 4. an empty .inter -------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["user_id:token\titem_id:token\ttimestamp:float\n",
                                     "user_id:token\titem_id:token\ttimestamp:float", "\n\n", ""])  # fmt: skip
def test_empty_inter_file(data, content):
    data.inter.write_text(content)
    with pytest.raises(ValueError, match=rf"^{NAME}\.inter has no interactions \((.*){NAME}\.inter\)"):
        data.dataset()


def test_item_file_with_only_a_header(data):
    data.item.write_text("item_id:token\ttitle:token_seq")  # no newline either: RecBole would misread the type
    with pytest.raises(ValueError, match=rf"^{NAME}\.item has no items \(.*\): it has a header line only; "):
        data.dataset()


def test_empty_inter_file_is_one_error_line_on_the_command_line(data, monkeypatch, tmp_path):
    from recbole_perpeft.cli import main

    data.inter.write_text("user_id:token\titem_id:token\ttimestamp:float\n")
    yaml = tmp_path / "bad.yaml"
    yaml.write_text(
        f"data_path: {data.keys['data_path']}\n"
        "load_col: {inter: [user_id, item_id, timestamp], item: [item_id, title]}\n"
        "text_field: title\n"
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["--model=GlobalPEFT", f"--dataset={NAME}", f"--config_files={yaml}", "--state=WARNING"])
    message = str(exit_info.value.code)
    assert message.startswith(f"error: {NAME}.inter has no interactions (") and "\n" not in message


# --- 5. too few items for top-k, and a dataset that filtering empties ------------------------------------------


def test_fewer_items_than_the_largest_topk_is_refused_up_front(data):
    with pytest.raises(
        ValueError, match=rf"^after filtering, {NAME} has 25 items; topk \[20, 30\] needs at least 30: "
    ):
        data.prepare(topk=[20, 30], valid_metric="hit@30")


def test_fewer_items_than_topk_after_user_sampling_names_the_ratio(data):
    with pytest.raises(
        ValueError, match=r"lower topk \(and valid_metric\) or use more users \(user_sample_ratio=0\.2\)"
    ):
        data.prepare(topk=[20, 30], valid_metric="hit@30", user_sample_ratio=0.2, item_inter_num_interval=None)


def test_dataset_emptied_by_k_core_names_the_settings(data):
    pattern = (
        rf"^after filtering, {NAME} has no interactions left \(0 users, 0 items\): loaded \d+ interactions of 30 "
        r"users and 25 items; user_inter_num_interval=\[50,inf\) and item_inter_num_interval=\[5,inf\) \(iterated\) "
        r"removed the remaining \d+\. Loosen user_inter_num_interval / item_inter_num_interval \(lower bounds"
    )
    with pytest.raises(ValueError, match=pattern):
        data.dataset(user_inter_num_interval="[50,inf)")


def test_dataset_emptied_after_user_sampling_names_the_ratio(data):
    pattern = r"user_sample_ratio=0\.05 kept 2 of 30 users \(\d+ interactions\); user_inter_num_interval=\[5,inf\)"
    with pytest.raises(ValueError, match=pattern) as err:
        data.dataset(user_sample_ratio=0.05)
    assert str(err.value).endswith(", or use a larger user_sample_ratio.")
