"""Checks of RecBole atomic files and of the data left after filtering.

Bad input gets one clear line naming the file, the line, the field or the value and what to do, raised
as ``ValueError`` (the command line prints it as ``error: ...``), instead of a pandas or RecBole
traceback or a silent change of the data. RecBole reads atomic files with pandas' python csv engine
(``csv.reader``, tab-separated, ``"`` quoting); the scans below read them the same way, so their line
numbers are the lines pandas read.
"""

from __future__ import annotations

import bisect
import csv
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from recbole.utils import FeatureType

FEATURE_TYPES = ", ".join(t.value for t in FeatureType)
# Values pandas reads as NaN (its default na_values), which are not parse errors.
NA_VALUES = {
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
    "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
}  # fmt: skip


def plural(n: int, word: str, words: str | None = None) -> str:
    return f"{n:,} {word if n == 1 else (words or word + 's')}"


# --- reading atomic files as pandas does ----------------------------------------------------------------


def _records(f, sep: str) -> Iterator[tuple[int, list[str]]]:
    """(first line number, fields) of each record after the header, blank lines skipped as pandas
    skips them. A quoted field may span lines, so a record's line is where it starts."""
    if len(sep) == 1:
        reader = csv.reader(f, delimiter=sep, quotechar='"', doublequote=True, strict=True)
        next(reader, None)
        previous = 1
        while True:
            try:
                record = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                raise _QuotingError(previous + 1, str(err)) from None  # the record's first line
            start, previous = previous + 1, reader.line_num
            if record and (len(record) > 1 or record[0].strip()):
                yield start, record
    else:  # pandas splits on a regular expression, line by line, after strip()
        pattern = re.compile(sep)
        next(f, None)
        for number, line in enumerate(f, start=2):
            record = pattern.split(line.strip())
            if len(record) > 1 or record[0].strip():
                yield number, record


class _QuotingError(Exception):
    def __init__(self, line: int, reason: str):
        super().__init__(reason)
        self.line, self.reason = line, reason


@dataclass
class LineMap:
    """Row index of the DataFrame pandas read -> line number in the file (1 is the header)."""

    rows: list[int] = field(default_factory=list)  # rows from which ``offsets`` apply
    offsets: list[int] = field(default_factory=list)

    def __call__(self, row: int) -> int:
        at = bisect.bisect_right(self.rows, row) - 1
        return row + 2 + (self.offsets[at] if at >= 0 else 0)


@dataclass
class Scan:
    rows: int
    lines: LineMap


def _open(path: str, encoding):
    return open(path, newline="", encoding=encoding)


def _decode_error(path: str, encoding) -> ValueError:
    """The first line that does not decode (text files are decoded a buffer at a time, so the
    exception itself does not say which)."""
    import codecs
    import locale

    codec = codecs.lookup(encoding or locale.getpreferredencoding(False)).name
    where = ""
    with open(path, "rb") as f:
        decoder = codecs.getincrementaldecoder(codec)()
        for number, line in enumerate(f, start=1):
            try:
                decoder.decode(line)
            except UnicodeDecodeError:
                where = f" line {number}"
                break
    return ValueError(
        f"{os.path.basename(path)}{where} is not valid {codec} text ({path}): re-save the file as UTF-8, or set "
        "encoding (e.g. --encoding=latin-1) to the one it was written in."
    )


def read_header(path: str, sep: str, encoding, what: str) -> list[tuple[str, str]]:
    """``[(field, type), ...]`` of the header line, checked the way RecBole will parse it.
    ``what``: what a data line is ('interactions', 'items', ...), for the empty-file message."""
    name = os.path.basename(path)
    try:
        with _open(path, encoding) as f:
            head = f.readline()
    except UnicodeDecodeError:
        raise _decode_error(path, encoding) from None
    head = head.rstrip("\r\n")
    if not head.strip():
        raise ValueError(
            f"{name} has no {what} ({path}): the file is empty; its first line must be a header of "
            f"name:type columns ({FEATURE_TYPES}), then one line per {what[:-1]}."
        )
    if head.startswith("\ufeff"):
        raise ValueError(
            f"{name} starts with a byte-order mark ({path}): RecBole would not recognise its first column; "
            "save it as UTF-8 without BOM, or set encoding: utf-8-sig."
        )
    columns = []
    for column in head.split(sep):
        parts = column.split(":")
        if len(parts) != 2 or not parts[0]:
            raise ValueError(
                f"{name} header: column {column!r} is not name:type ({path}); the first line names each "
                f"column as name:type ({FEATURE_TYPES}), separated by {sep!r}."
            )
        if parts[1] not in {t.value for t in FeatureType}:
            raise ValueError(
                f"{name} header: column {parts[0]!r} has type {parts[1]!r}, not one of {FEATURE_TYPES} ({path})."
            )
        columns.append((parts[0], parts[1]))
    return columns


def require_columns(path: str, header: list[tuple[str, str]], fields: dict[str, str | None]) -> None:
    """``fields``: {config key: field name} that must be columns of the file."""
    names = [name for name, _ in header]
    for key, name in fields.items():
        if name and name not in names:
            listed = ", ".join(f"{n}:{t}" for n, t in header)
            raise ValueError(
                f"{os.path.basename(path)} has no column {name!r} (its header: {listed}; {path}): add it, "
                f"or set {key} to the column that holds it."
            )


def require_float_time(path: str, header: list[tuple[str, str]], time_field: str | None, load_col) -> None:
    """The time field must be ``float``: RecBole orders each user's interactions by it, and a ``token``
    column would be ordered by the order of first appearance of its values (a string type by nothing at all)."""
    types = dict(header)
    if not time_field or time_field not in types or types[time_field] == "float":
        return
    if load_col is not None and time_field not in load_col:
        return  # not read: sequences keep the file's order
    listed = "\t".join(f"{n}:{t}" for n, t in header)
    raise ValueError(
        f"{os.path.basename(path)} header declares the time field as {time_field}:{types[time_field]} ({path}; "
        f"header: {listed!r}): interactions are ordered by it, so it must be {time_field}:float (Unix seconds or "
        "any number); change the header, or set TIME_FIELD to another column."
    )


def scan_rows(path: str, sep: str, encoding, n_fields: int, refuse_fewer: bool) -> Scan:
    """Refuse a line with more fields than the header (pandas would drop the extra values, or, on the
    first line, shift every column by one), and with ``refuse_fewer`` one with fewer. Returns the
    number of data rows and where each row is in the file."""
    name = os.path.basename(path)
    more, fewer = [], []
    lines = LineMap()
    offset = rows = 0
    try:
        with _open(path, encoding) as f:
            for start, record in _records(f, sep):
                if len(record) > n_fields:
                    more.append(start)
                elif len(record) < n_fields:
                    fewer.append(start)
                if start - rows - 2 != offset:
                    offset = start - rows - 2
                    lines.rows.append(rows)
                    lines.offsets.append(offset)
                rows += 1
    except _QuotingError as err:
        raise ValueError(
            f"{name} line {err.line}: a field that starts with a double quote must end with one ({err.reason}; "
            f'{path}): quote the whole field and double the quotes inside it ("a ""b"" c"), or remove them.'
        ) from None
    except UnicodeDecodeError:
        raise _decode_error(path, encoding) from None
    sep_name = "tab" if sep == "\t" else repr(sep)
    if more:
        raise ValueError(
            f"{name} line {more[0]} has more {sep_name}-separated fields than its header's {n_fields} "
            f"({plural(len(more), 'such line')}; {path}): remove the extra fields (a {sep_name} inside a "
            "value?) or name them in the header."
        )
    if fewer and refuse_fewer:
        raise ValueError(
            f"{name} line {fewer[0]} has fewer {sep_name}-separated fields than its header's {n_fields} "
            f"({plural(len(fewer), 'such line')}; {path}): complete or remove these lines."
        )
    return Scan(rows, lines)


def _not_a_number(value: str) -> bool:
    text = value.strip()
    if text in NA_VALUES:
        return False
    if "_" in text:  # float() accepts 1_000, pandas does not
        return True
    try:
        float(text)
    except ValueError:
        return True
    return False


def explain_load_error(path: str, sep: str, encoding, seq_sep: str, header, error: ValueError) -> ValueError:
    """A ValueError of RecBole's/pandas' read as one line: the first value of a float column that is
    not a number, with its line and field; otherwise the original message, with the file."""
    name = os.path.basename(path)
    floats = {i: (f, t) for i, (f, t) in enumerate(header) if t in ("float", "float_seq")}
    bad: list[tuple[int, str, str, str]] = []  # (line, field, type, value)
    try:
        with _open(path, encoding) as f:
            for start, record in _records(f, sep):
                for index, (fname, ftype) in floats.items():
                    if index >= len(record):
                        continue
                    values = [record[index]] if ftype == "float" else [v for v in record[index].split(seq_sep) if v]
                    for value in values:
                        if _not_a_number(value):
                            bad.append((start, fname, ftype, value))
                            break
    except (_QuotingError, UnicodeDecodeError):
        bad = []
    if bad:
        line, fname, ftype, value = bad[0]
        return ValueError(
            f"{name} line {line}: {fname} {value!r} is not a number, but the header declares {fname}:{ftype} "
            f"({plural(len(bad), 'such line')}; {path}): fix or remove these lines, or declare the column "
            f"as {'token' if ftype == 'float' else 'token_seq'}."
        )
    return ValueError(f"{name} could not be read ({path}): {error}")


# --- where the files are -----------------------------------------------------------------------------------


def embedded_dataset_path(dataset: str, data_root: str, bundled: str, given: bool) -> str:
    """The folder to read ``ml-100k`` from. RecBole reads its bundled copy (``bundled``) whatever
    ``data_path`` says, while our ``image_dir`` follows ``data_path``: here ``<data_root>/ml-100k/`` is read
    when it holds ``ml-100k.inter``, as for every other dataset; a ``data_path`` the user gave without it is
    refused; otherwise (the default ``data_path``) the bundled copy is read."""
    folder = os.path.join(data_root, dataset)
    if os.path.isfile(os.path.join(folder, f"{dataset}.inter")):
        return folder
    if given:
        raise ValueError(
            f"data_path={data_root!r} has no {dataset}/{dataset}.inter ({folder}): put {dataset}.inter (and "
            f"{dataset}.item) there, or leave data_path out to read the copy of {dataset} that ships with RecBole "
            f"({os.path.normpath(bundled)})."
        )
    return bundled


# --- the data after filtering -------------------------------------------------------------------------------


def max_topk(config) -> int | None:
    topk = config["topk"]
    if topk is None:
        return None
    values = topk if isinstance(topk, (list, tuple)) else [topk]
    return max(int(k) for k in values) if values else None


def check_enough_items(config, dataset) -> None:
    """Full ranking takes the top max(topk) of all items: fewer items than that crash RecBole's
    evaluation (torch.topk, 'selected index k out of range') after a whole training epoch."""
    k = max_topk(config)
    n_items = dataset.item_num - 1  # without the padding item
    if k is None or n_items >= k:
        return
    ratio = config["user_sample_ratio"]
    sampled = f" (user_sample_ratio={ratio})" if ratio not in (None, 1, 1.0) else ""
    raise ValueError(
        f"after filtering, {config['dataset']} has {plural(n_items, 'item')}; topk {config['topk']} "
        f"needs at least {k}: lower topk (and valid_metric) or use more users{sampled}."
    )
