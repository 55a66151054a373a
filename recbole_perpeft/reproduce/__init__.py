"""One command per paper table: run its rows over seeds and write JSON, Markdown and a PNG chart.

    recbole-perpeft reproduce --table=2|3|4|missing --dataset=D [--peft=LORA,IA3,IISAN] [--seeds=3]
        [--rows=A,B] [--extend] [--result_dir=DIR] [--config_files=a.yaml] [--key=value ...]

- The tables' rows (tables.py): Table 2 per PEFT type (w/o MM, FrozenMM, GlobalPEFT, UserLevel1/2, GroupLevel1/2,
  PerPEFT; w/o MM and FrozenMM run once and show in every block), Table 3's ablations on the first PEFT type (plus
  a "beyond the paper" block), Table 4: LATTICE and BM3 against PerPEFT with (IA)3 (docs/models-table4.md),
  ``missing``: GlobalPEFT and PerPEFT with 0, 25 and 50% of the item images removed.
- Equal training: single-stage rows train ``stage1_epochs + stage2_epochs`` epochs (10 + 20 = 30 by default)
  unless ``--epochs`` is given; two-stage rows train their two stages. Two-stage rows whose settings differ only
  in stage-2 keys share one stage-1 GlobalPEFT per seed (recbole_perpeft.compare.run_rows).
- Runs go to ``<result_dir>/runs/<label>-seed<s>.json`` and are reused when the command is run again. With
  ``--extend``, finished runs of a shorter schedule (the table at 10 epochs, asked now with more) are continued
  to the new one by ``--resume`` instead, the shorter runs' files kept (recbole_perpeft/extend_runs.py).
- ``<result_dir>/<table2|table3|missing>.json``: every row's per-seed values, mean and std, and per block the
  comparison summary (recbole_perpeft.compare_report: paired t-tests against the block's PerPEFT); ``.md``: the
  blocks as the paper prints them, with the paper's numbers beside ours where paper_tables.yaml has them;
  ``.png``: bars with error bars per metric (``missing``: the valid metric against the share removed).
- Rows that remove a modality (and the whole ``missing`` table) are skipped, with the reason printed, on a dataset
  without item images.

:func:`reproduce` is the same as a function (``entries=`` runs other rows)."""

from recbole_perpeft.reproduce.runner import reproduce
from recbole_perpeft.reproduce.tables import DEFAULT_PEFT, TABLES, Entry, table_entries

__all__ = ["DEFAULT_PEFT", "TABLES", "Entry", "reproduce", "table_entries"]
