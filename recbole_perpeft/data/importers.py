"""Other layouts -> our RecBole atomic files (``NAME.inter``, ``NAME.item``, ``images/{item_id}.jpg``).

Also holds the one atomic-file writer every source uses (the Amazon 2023 preprocessing included), so
all datasets come out with the same columns, title sanitising and write-then-rename discipline.

Layouts:

- ``perpeft`` (the PerPEFT authors'): ``{ds}_final.txt`` (``user item`` lines in time order, items
  as the pickles' int ids), ``{ds}_item2id_final.pickle`` (raw id -> int id),
  ``{ds}_texts_final.pickle`` (int id -> title), ``{ds}_images/{raw id}.jpg``.
- ``iisan`` (the IISAN authors'): ``*items.tsv`` (``asin<TAB>title``, HTML-escaped) and ``*users.tsv``
  (``user<TAB>asin asin ...`` in time order).

Neither has timestamps: each user's purchases get 0, 1, 2, ... in file order, which is all RecBole's
time ordering needs. Pickles are read with :class:`PlainUnpickler`, which builds plain containers and
scalars only: a pickle can run code on load, and these files come from elsewhere.
"""

from __future__ import annotations

import html
import os
import pickle
import shutil
from collections.abc import Iterable, Mapping
from logging import getLogger
from pathlib import Path

logger = getLogger(__name__)

LAYOUTS = ("perpeft", "iisan")
PLAIN_TYPES = (dict, list, tuple, str, int, float, bool, type(None))


# --- the atomic-file writer ------------------------------------------------------------------------------


def clean_title(title: object) -> str:
    """One line of text: tabs/newlines/runs of spaces -> one space (they would break the TSV)."""
    return " ".join(str(title).split()) if title is not None else ""


def tsv_field(text: str) -> str:
    """CSV-quote a field holding '"': RecBole reads atomic files with pandas' csv reader, which would
    take a leading quote as the start of a quoted field and swallow what follows."""
    return '"' + text.replace('"', '""') + '"' if '"' in text else text


def _write_lines(path: Path, lines: Iterable[str]) -> None:
    """Write to ``path.tmp`` and rename: a crash never leaves a half-written atomic file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            f.write(line + "\n")
    os.replace(tmp, path)


def write_atomic_files(
    folder: Path,
    name: str,
    interactions: Iterable[tuple[str, str, float]],
    titles: Mapping[str, str],
    inter_path: Path | None = None,
) -> None:
    """``folder/name.item`` (``item_id:token  title:token_seq``; '' = missing text), then the
    interactions (``user_id:token  item_id:token  timestamp:float``) to ``inter_path`` (default
    ``folder/name.inter``), written last because its presence means "dataset ready"."""
    folder.mkdir(parents=True, exist_ok=True)
    item_lines = (f"{item}\t{tsv_field(clean_title(title))}" for item, title in titles.items())
    _write_lines(folder / f"{name}.item", ["item_id:token\ttitle:token_seq", *item_lines])

    def inter_lines():
        yield "user_id:token\titem_id:token\ttimestamp:float"
        for user, item, ts in interactions:
            yield f"{user}\t{item}\t{ts}"

    _write_lines(inter_path or folder / f"{name}.inter", inter_lines())


# --- safe pickles ----------------------------------------------------------------------------------------


class UnsafePickleError(ValueError):
    """A pickle that is not plain data (a class instance, a function reference, ...)."""


class PlainUnpickler(pickle.Unpickler):
    """Refuses every global: only what pickle builds without importing anything can come out
    (containers, str, numbers, bytes); :func:`load_plain_pickle` then accepts plain data only."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"global '{module}.{name}' refused")


def _check_plain(value: object, path: Path) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if not isinstance(item, PLAIN_TYPES):
            kind = type(item).__name__
            raise UnsafePickleError(f"{path} holds a {kind}; only plain dicts/lists/str/numbers are read.")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def load_plain_pickle(path: Path, expect: type = dict):
    """The object in ``path`` if it is plain data of type ``expect``; else :class:`UnsafePickleError`."""
    try:
        with open(path, "rb") as f:
            value = PlainUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, AttributeError) as err:
        raise UnsafePickleError(
            f"Refusing to load {path}: not a plain-data pickle ({err}). Only dicts/lists of str and numbers "
            "are accepted; re-save it with plain Python types (e.g. dict(...) of str/int)."
        ) from err
    _check_plain(value, path)
    if not isinstance(value, expect):
        raise UnsafePickleError(f"{path} holds a {type(value).__name__}, expected a {expect.__name__}.")
    return value


# --- the PerPEFT authors' layout -------------------------------------------------------------------------


def _perpeft_prefix(source: Path, dataset: str) -> str:
    found = sorted(p.name[: -len("_final.txt")] for p in source.glob("*_final.txt"))
    if not found:
        raise FileNotFoundError(f"No *_final.txt in {source}: not the PerPEFT authors' layout.")
    if len(found) > 1 and dataset not in found:
        raise ValueError(f"{source} holds several datasets ({found}); name one of them with --dataset.")
    return dataset if dataset in found else found[0]


def import_perpeft(source: Path, folder: Path, name: str, image_dir: Path | None = None) -> dict:
    """PerPEFT layout in ``source`` -> atomic files in ``folder``; items are named by their raw id."""
    prefix = _perpeft_prefix(source, name)
    item2id = load_plain_pickle(source / f"{prefix}_item2id_final.pickle")
    texts = load_plain_pickle(source / f"{prefix}_texts_final.pickle")
    id2raw = {str(v): str(k) for k, v in item2id.items()}

    def token(item: str) -> str:
        return id2raw.get(item, item)  # an int id of the pickles, or already a raw id

    interactions, position, unknown = [], {}, 0
    with open(source / f"{prefix}_final.txt", encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 2:
                continue
            user, item = parts[0], token(parts[1])
            unknown += item not in item2id
            interactions.append((user, item, position.get(user, 0)))
            position[user] = position.get(user, 0) + 1
    raw2id = {str(k): v for k, v in item2id.items()}
    items = dict.fromkeys(item for _, item, _ in interactions)
    titles = {item: _title_of(texts, raw2id.get(item), item) for item in items}
    write_atomic_files(folder, name, interactions, titles)

    copied = _copy_images(source / f"{prefix}_images", image_dir or folder / "images", items)
    stats = {
        "users": len(position),
        "items": len(items),
        "interactions": len(interactions),
        "items_with_title": sum(bool(clean_title(t)) for t in titles.values()),
        "images": copied,
        "items_not_in_item2id": unknown,
    }
    logger.info(f"Imported the PerPEFT layout of {source} as {name}: {stats}")
    return stats


def _title_of(texts: dict, int_id: object, raw_id: str) -> str:
    """The title keyed by the int id (as an int or its string), else by the raw id; '' if none."""
    for key in (int_id, str(int_id), raw_id):
        if key is not None and key in texts:
            return texts[key]
    return ""


def _copy_images(source: Path, target: Path, items: Iterable[str]) -> int:
    """``source/{raw id}.jpg`` -> ``target/{item token}.jpg`` (token = raw id); hard link when possible."""
    if not source.is_dir():
        return 0
    target.mkdir(parents=True, exist_ok=True)
    copied = 0
    for item in items:
        src, dst = source / f"{item}.jpg", target / f"{item}.jpg"
        if not src.is_file() or "/" in item or item.startswith("."):
            continue
        if not dst.exists():
            try:
                os.link(src, dst)
            except OSError:  # another file system, or links not allowed
                shutil.copyfile(src, dst)
        copied += 1
    return copied


# --- the IISAN authors' layout ---------------------------------------------------------------------------


def _one(source: Path, pattern: str) -> Path:
    found = sorted(source.glob(pattern))
    if len(found) != 1:
        raise FileNotFoundError(f"Expected one {pattern} in {source}, found {[p.name for p in found] or 'none'}.")
    return found[0]


def import_iisan(source: Path, folder: Path, name: str) -> dict:
    """IISAN layout in ``source`` -> atomic files in ``folder``; HTML entities in titles unescaped."""
    titles: dict[str, str] = {}
    with open(_one(source, "*items.tsv"), encoding="utf-8") as f:
        for line in f:
            item, _, title = line.rstrip("\n").partition("\t")
            if item:
                titles[item] = html.unescape(title)
    interactions = []
    with open(_one(source, "*users.tsv"), encoding="utf-8") as f:
        for line in f:
            user, _, items = line.rstrip("\n").partition("\t")
            interactions += [(user, item, t) for t, item in enumerate(items.split())]
    used = dict.fromkeys(item for _, item, _ in interactions)
    all_titles = {**titles, **{item: "" for item in used if item not in titles}}
    write_atomic_files(folder, name, interactions, all_titles)
    stats = {
        "users": len({u for u, _, _ in interactions}),
        "items": len(all_titles),
        "interactions": len(interactions),
        "items_with_title": sum(bool(clean_title(t)) for t in titles.values()),
        "items_without_title": len(all_titles) - len(titles),
    }
    logger.info(f"Imported the IISAN layout of {source} as {name}: {stats}")
    return stats


def layout_files(layout: str) -> list[str]:
    """What a layout's source folder must hold (for error messages)."""
    return {
        "perpeft": ["{ds}_final.txt", "{ds}_item2id_final.pickle", "{ds}_texts_final.pickle", "{ds}_images/"],
        "iisan": ["*items.tsv", "*users.tsv"],
    }[layout]


def has_layout(source: Path, layout: str) -> bool:
    if not source.is_dir():
        return False
    if layout == "perpeft":
        return any(source.glob("*_final.txt"))
    return any(source.glob("*items.tsv")) and any(source.glob("*users.tsv"))


def import_layout(layout: str, source: Path, folder: Path, name: str, image_dir: Path | None = None) -> dict:
    if layout == "perpeft":
        return import_perpeft(source, folder, name, image_dir)
    if layout == "iisan":
        return import_iisan(source, folder, name)
    raise ValueError(f"Unknown layout '{layout}': expected one of {list(LAYOUTS)}.")
