"""The rows of the paper's tables: which model, with which overrides, in which block.

- Table 2 (paper Table 2), one block per PEFT type: w/o MM (``WithoutMM``, ID only), FrozenMM, GlobalPEFT,
  UserLevel1/2, GroupLevel1/2, PerPEFT. w/o MM and FrozenMM train no adapter: one run each, shown in every block.
- Table 3 (ablations, on one PEFT type): w/o text, w/o image, w/o group negatives, LargeGlobalPEFT, random
  grouping, PerPEFT; then a "beyond the paper" block: soft multi-interest (``soft_groups=2``) against PerPEFT.
- ``missing``: GlobalPEFT and PerPEFT with a share of the item images removed at random
  (``missing_image_ratio``), one block per share.
- Table 4 (paper Table 4): the non-sequential multimodal baselines LATTICE and BM3 (our general models, on the
  same users, items, split and frozen item features) against PerPEFT, one block, (IA)3 by default.

Labels name the run files (recbole_perpeft.compare.safe_name); names are what a block prints."""

from __future__ import annotations

from dataclasses import dataclass

from recbole_perpeft.compare import Row
from recbole_perpeft.config_values import choice

TABLES = ("2", "3", "4", "missing")
DEFAULT_PEFT = ("LORA", "IA3", "IISAN")
TABLE_PEFT = {"4": ("IA3",)}  # a table whose paper version has other PEFT types than DEFAULT_PEFT
# Rows that train as their own papers do (their YAML: early stopping on the validation metric), not on the
# PerPEFT schedule that equal training gives the other single-stage rows.
OWN_SCHEDULE = ("LATTICE", "BM3")
REFERENCE = "PerPEFT"  # every block's paired t-tests are against its PerPEFT row
MISSING_RATIOS = (0.0, 0.25, 0.5)
SOFT_GROUPS = 2


@dataclass(frozen=True)
class Entry:
    """A row as one block of a table shows it. Blocks may share a row (the same label runs once)."""

    block: str  # the block's title ("LORA", "beyond the paper (LORA)", "25% of images removed")
    name: str  # the row's name in the block, as the paper prints it; the reference row is named REFERENCE
    row: Row
    needs_images: bool = False  # skipped, with the reason printed, on a dataset without item images
    x: float | None = None  # where the row sits on a line plot's x axis (the missing table's share)


def parse_peft(value) -> list[str]:
    """'LORA,IA3, iisan' (or a list) -> ['LORA', 'IA3', 'IISAN']: peft types as registered (upper case)."""
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else [str(n).strip() for n in value]
    if not names or any(not n for n in names):
        raise ValueError(f"--peft needs comma-separated PEFT types (e.g. --peft=LORA,IA3,IISAN), got {value!r}.")
    names = [n.upper() for n in names]
    if len(set(names)) != len(names):
        raise ValueError(f"--peft: a PEFT type is listed twice in {value!r}.")
    return names


def table2(peft_types) -> list[Entry]:
    without_mm = Row("w/o MM", "WithoutMM", {})
    frozen = Row("FrozenMM", "FrozenMM", {})
    entries = []
    for peft in peft_types:
        entries += [Entry(peft, "w/o MM", without_mm), Entry(peft, "FrozenMM", frozen)]
        for model in ("GlobalPEFT", "UserLevel1", "UserLevel2", "GroupLevel1", "GroupLevel2", "PerPEFT"):
            entries.append(Entry(peft, model, Row(f"{model} {peft}", model, {"peft_type": peft})))
    return entries


def table3(peft: str) -> list[Entry]:
    def row(label, model="PerPEFT", **overrides):
        return Row(f"{label} {peft}", model, {"peft_type": peft, **overrides})

    perpeft = row("PerPEFT")
    beyond = f"beyond the paper ({peft})"
    return [
        Entry(peft, "w/o text", row("w/o text", modalities=["image"]), needs_images=True),
        Entry(peft, "w/o image", row("w/o image", modalities=["text"]), needs_images=True),
        Entry(peft, "w/o group negatives", row("w/o group negatives", group_negatives=False)),
        Entry(peft, "LargeGlobalPEFT", row("LargeGlobalPEFT", model="LargeGlobalPEFT")),
        Entry(peft, "random grouping", row("random grouping", grouping_method="random")),
        Entry(peft, REFERENCE, perpeft),
        Entry(beyond, f"soft multi-interest (soft_groups={SOFT_GROUPS})",
              row(f"soft groups {SOFT_GROUPS}", soft_groups=SOFT_GROUPS)),  # fmt: skip
        Entry(beyond, REFERENCE, perpeft),
    ]


def missing_block(ratio: float) -> str:
    return f"{ratio * 100:g}% of images removed"


def missing(peft: str) -> list[Entry]:
    entries = []
    for ratio in MISSING_RATIOS:
        # 0 is the default: the key is left out and the rows are Table 2's (same labels: with one --result_dir
        # for both tables, their runs are shared).
        extra, suffix = ({"missing_image_ratio": ratio}, f" missing{ratio:g}") if ratio else ({}, "")
        for model in ("GlobalPEFT", REFERENCE):
            row = Row(f"{model} {peft}{suffix}", model, {"peft_type": peft, **extra})
            entries.append(Entry(missing_block(ratio), model, row, needs_images=True, x=ratio))
    return entries


def table4(peft: str) -> list[Entry]:
    return [Entry(peft, "LATTICE", Row("LATTICE", "LATTICE", {})), Entry(peft, "BM3", Row("BM3", "BM3", {})),
            Entry(peft, REFERENCE, Row(f"PerPEFT {peft}", REFERENCE, {"peft_type": peft}))]  # fmt: skip


def default_peft(table: str) -> tuple[str, ...]:
    return TABLE_PEFT.get(str(table), DEFAULT_PEFT)


def table_entries(table: str, peft_types=None) -> list[Entry]:
    """The entries of ``table`` ('2', '3', '4', 'missing'); Tables 3, 4 and missing use the first PEFT type
    (``peft_types`` None: the table's default, :func:`default_peft`)."""
    table = choice(str(table), TABLES, "--table")
    peft_types = parse_peft(default_peft(table) if peft_types is None else peft_types)
    if table == "2":
        return table2(peft_types)
    if table == "4":
        return table4(peft_types[0])
    return table3(peft_types[0]) if table == "3" else missing(peft_types[0])


def rows_of(entries) -> list[Row]:
    """The distinct rows of ``entries`` in first-seen order; one label with two settings is an error."""
    rows = {}
    for entry in entries:
        seen = rows.setdefault(entry.row.label, entry.row)
        if seen != entry.row:
            raise ValueError(f"row label {entry.row.label!r} is used for two settings: {seen} and {entry.row}.")
    return list(rows.values())


def blocks_of(entries) -> dict[str, list[Entry]]:
    """{block title: its entries}, in first-seen order; names are unique within a block."""
    blocks = {}
    for entry in entries:
        block = blocks.setdefault(entry.block, [])
        if any(e.name == entry.name for e in block):
            raise ValueError(f"block {entry.block!r} has two rows named {entry.name!r}.")
        block.append(entry)
    return blocks
