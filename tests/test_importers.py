"""Importers of the PerPEFT and IISAN authors' layouts into our atomic files, the plain-data-only
pickle loader, and the real amazon-scientific release (when /work/shared has it)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from recbole_perpeft.data.importers import UnsafePickleError, import_perpeft, load_plain_pickle
from recbole_perpeft.data.prepare import ensure_atomic_files, main
from tests.tiny import build_config

SCIENTIFIC = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "amazon-scientific"


def read_atomic(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, delimiter="\t", dtype=str, engine="python", keep_default_na=False)


def sequences(inter: pd.DataFrame) -> dict[str, list[str]]:
    return {u: list(g["item_id:token"]) for u, g in inter.groupby("user_id:token", sort=False)}


# --- safe pickles --------------------------------------------------------------------------------------


class Payload:
    """Unpickling this would run a command (if the loader allowed globals)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Plain:
    def __init__(self):
        self.x = 1


@pytest.mark.parametrize("kind", ["os.system call", "os.system reference", "class instance", "numpy scalar"])
def test_pickles_that_are_not_plain_data_are_refused(tmp_path, kind):
    marker = tmp_path / "pwned"
    path = tmp_path / f"{kind.replace(' ', '_')}.pickle"
    value = {
        "os.system call": lambda: {1: Payload(marker)},
        "os.system reference": lambda: os.system,
        "class instance": lambda: Plain(),
        "numpy scalar": lambda: {__import__("numpy").int64(1): "title"},
    }[kind]()
    path.write_bytes(pickle.dumps(value))
    with pytest.raises(UnsafePickleError, match="Refusing to load") as err:
        load_plain_pickle(path)
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_plain_pickles_load_and_other_types_are_refused(tmp_path):
    path = tmp_path / "ok.pickle"
    value = {"B001": 1, "B002": 2, "nested": [("a", 1.5, None, True)]}
    path.write_bytes(pickle.dumps(value, protocol=2))
    assert load_plain_pickle(path) == value
    path.write_bytes(pickle.dumps(["not", "a", "dict"]))
    with pytest.raises(UnsafePickleError, match="holds a list, expected a dict") as err:
        load_plain_pickle(path)
    assert str(path) in str(err.value)
    path.write_bytes(pickle.dumps({1: b"bytes"}))
    with pytest.raises(UnsafePickleError, match="holds a bytes"):
        load_plain_pickle(path)


# --- the PerPEFT layout --------------------------------------------------------------------------------


def make_perpeft_layout(folder: Path, prefix: str = "Toy") -> dict[str, list[str]]:
    folder.mkdir(parents=True, exist_ok=True)
    item2id = {f"B{i:03d}": i for i in range(1, 7)}
    texts = {i: f"Item {i}\twith tab" if i == 2 else f"Item {i}" for i in range(1, 6)}  # item 6: no title
    seqs = {"7": ["B003", "B001", "B002", "B006", "B004"], "3": ["B002", "B005", "B001", "B003", "B004", "B005"]}
    lines = []
    for k in range(6):  # users interleaved, as in a time-ordered file
        for user, seq in seqs.items():
            if k < len(seq):
                lines.append(f"{user} {item2id[seq[k]]}")
    (folder / f"{prefix}_final.txt").write_text("\n".join(lines) + "\n")
    (folder / f"{prefix}_item2id_final.pickle").write_bytes(pickle.dumps(item2id))
    (folder / f"{prefix}_texts_final.pickle").write_bytes(pickle.dumps(texts))
    (folder / f"{prefix}_images").mkdir()
    for raw_id in ("B001", "B003"):
        Image.new("RGB", (8, 8), (200, 10, 10)).save(folder / f"{prefix}_images" / f"{raw_id}.jpg")
    return seqs


def test_import_perpeft_layout(tmp_path):
    source, out = tmp_path / "src", tmp_path / "data" / "toy"
    seqs = make_perpeft_layout(source)
    stats = import_perpeft(source, out, "toy")
    inter = read_atomic(out / "toy.inter")
    assert sequences(inter) == seqs  # items named by their raw id, file order kept
    for _, g in inter.groupby("user_id:token"):
        assert g["timestamp:float"].astype(int).tolist() == list(range(len(g)))
    titles = dict(zip(*read_atomic(out / "toy.item").to_numpy().T, strict=True))
    assert titles == {
        "B001": "Item 1",
        "B002": "Item 2 with tab",
        "B003": "Item 3",
        "B004": "Item 4",
        "B005": "Item 5",
        "B006": "",
    }
    assert sorted(p.name for p in (out / "images").iterdir()) == ["B001.jpg", "B003.jpg"]
    assert (out / "images" / "B001.jpg").read_bytes() == (source / "Toy_images" / "B001.jpg").read_bytes()
    assert stats == {
        "users": 2,
        "items": 6,
        "interactions": 11,
        "items_with_title": 5,
        "images": 2,
        "items_not_in_item2id": 0,
    }


def test_perpeft_import_refuses_an_unsafe_pickle(tmp_path):
    source = tmp_path / "src"
    make_perpeft_layout(source)
    bad = source / "Toy_texts_final.pickle"
    bad.write_bytes(pickle.dumps({1: Payload(tmp_path / "pwned")}))
    with pytest.raises(UnsafePickleError, match="Toy_texts_final.pickle"):
        import_perpeft(source, tmp_path / "out", "toy")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out" / "toy.inter").exists()


def test_cli_imports_a_layout(tmp_path):
    make_perpeft_layout(tmp_path / "src")
    argv = ["--dataset=mine", "--layout=perpeft", f"--source={tmp_path / 'src'}", f"--data_path={tmp_path / 'd'}"]
    assert main(argv) == 0
    assert (tmp_path / "d" / "mine" / "mine.inter").is_file() and (tmp_path / "d" / "mine" / "images").is_dir()


# --- the IISAN layout ----------------------------------------------------------------------------------


def make_iisan_layout(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    items = ["A1\tSalt &amp; Pepper 12&quot; mill", 'A2\t"Quoted" start', "A3\tPlain", "A4\t"]
    (folder / "toy_items.tsv").write_text("\n".join(items) + "\n")
    users = ["u1\tA1 A2 A3 A1 A4", "u2\tA3 A2 A4 A1 A2", "u3\tA4 A3 A2 A1 A3"]
    (folder / "toy_users.tsv").write_text("\n".join(users) + "\n")


def test_import_iisan_layout_through_config(tmp_path):
    """--raw_layout=iisan --raw_dir=DIR on a new dataset name: imported by create_dataset on first use
    (not by Config), and RecBole reads back the unescaped titles (quotes included)."""
    from recbole_perpeft.data import create_dataset

    make_iisan_layout(tmp_path / "src")
    config = build_config(
        "SASRec",
        "toyiisan",
        {
            "data_path": str(tmp_path / "data"),
            "raw_layout": "iisan",
            "raw_dir": str(tmp_path / "src"),
            "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title"]},
            "text_field": "title",
            "user_inter_num_interval": "[0,inf)",
            "item_inter_num_interval": "[0,inf)",
        },
    )
    assert not (tmp_path / "data" / "toyiisan").exists()
    dataset = create_dataset(config)
    inter = read_atomic(tmp_path / "data" / "toyiisan" / "toyiisan.inter")
    assert sequences(inter) == {
        "u1": ["A1", "A2", "A3", "A1", "A4"],
        "u2": ["A3", "A2", "A4", "A1", "A2"],
        "u3": ["A4", "A3", "A2", "A1", "A3"],
    }
    texts = dict(zip(dataset.field2id_token["item_id"], dataset.item_texts(), strict=True))
    assert texts["A1"] == 'Salt & Pepper 12" mill' and texts["A2"] == '"Quoted" start'
    assert texts["A3"] == "Plain" and texts["A4"] == ""


def test_known_dataset_without_its_files_says_where_to_put_them(tmp_path):
    config = {"dataset": "amazon-scientific", "data_path": str(tmp_path / "amazon-scientific"), "raw_layout": "iisan"}
    with pytest.raises(FileNotFoundError) as err:
        ensure_atomic_files(config)
    message = str(err.value)
    assert str(tmp_path / "amazon-scientific" / "raw") in message and "*users.tsv" in message
    assert "recbole-perpeft prepare --dataset=amazon-scientific --layout=iisan" in message


def test_real_amazon_scientific_imports_on_first_use(tmp_path):
    if not (SCIENTIFIC / "users.tsv").is_file():
        pytest.skip(f"the amazon-scientific release is not at {SCIENTIFIC} (optional; see dataset/README.md)")
    from recbole_perpeft.data import create_dataset

    config = build_config("SASRec", "amazon-scientific", {"data_path": str(tmp_path), "raw_dir": str(SCIENTIFIC)})
    create_dataset(config)
    folder = tmp_path / "amazon-scientific"
    inter = read_atomic(folder / "amazon-scientific.inter")
    items = read_atomic(folder / "amazon-scientific.item")
    assert inter["user_id:token"].nunique() == 12_076 and len(inter) == 85_211  # the README's counts
    assert len(items) == 20_825 and (items["title:token_seq"] != "").all()
    assert set(inter["item_id:token"]) <= set(items["item_id:token"])
    assert not items["title:token_seq"].str.contains("&amp;|&quot;").any()
    assert not list(SCIENTIFIC.parent.glob("amazon-scientific/*.inter"))  # the source stays untouched
