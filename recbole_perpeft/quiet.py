"""What a run prints: progress, the metrics and where its files went; the rest goes to the log file.

* ``FILE_ONLY`` (``logger.info(text, extra=FILE_ONLY)``) keeps a record out of the console: the config
  dump and the model's module printout (hundreds of lines) stay in RecBole's log file.
* ``silence_known_warnings`` ignores warnings known to be harmless, each matched by category, message
  and the module that triggers it (never a whole category).
* ``show_progress`` covers the bars of the libraries we call (transformers' "Loading weights").
"""

from __future__ import annotations

import logging
import sys
import warnings

import pandas

FILE_ONLY = {"file_only": True}

# (category, message regex, module that triggers it, why it is harmless)
KNOWN_HARMLESS = [
    (FutureWarning, r"`torch\.cuda\.amp\.GradScaler\(args\.\.\.\)` is deprecated", r"recbole\.trainer\.trainer",
     "RecBole 1.2.1's training loop builds torch.cuda.amp.GradScaler, the same class as torch.amp's"),
    (FutureWarning, r"using <built-in function len> in Series\.agg cannot aggregate", r"recbole\.data\.dataset",
     "RecBole's sequence lengths: Series.agg(len) still gives the per-user counts (pandas 2)"),
]
if int(pandas.__version__.split(".")[0]) < 3:  # pandas 3 (copy-on-write) drops these in-place fills: then it matters
    KNOWN_HARMLESS.append(
        (FutureWarning, r"A value is trying to be set on a copy of a DataFrame or Series through chained assignment",
         r"recbole\.data\.dataset", "RecBole's fillna(inplace=True) of missing values, still in place before pandas 3")
    )  # fmt: skip


def silence_known_warnings() -> None:
    for category, message, module, _why in KNOWN_HARMLESS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


class _NotFileOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "file_only", False)


def console_skips_file_only() -> None:
    """Keep ``FILE_ONLY`` records off the root logger's console handlers (RecBole's init_logger makes a
    StreamHandler and a FileHandler); idempotent."""
    for handler in logging.getLogger().handlers:
        console = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
        if console and not any(isinstance(f, _NotFileOnly) for f in handler.filters):
            handler.addFilter(_NotFileOnly())


def log_files() -> list[str]:
    """The root logger's log files (RecBole's ``log/<model>/...log``)."""
    return [h.baseFilename for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]


def library_progress_bars(show: bool) -> None:
    """``show_progress: False`` turns off the bars of transformers (weights loading) and huggingface_hub
    (downloads); True leaves them as they are (on, unless the user's environment turned them off).
    transformers reads huggingface_hub's switch when imported: set that, importing transformers (seconds)
    only where something has already."""
    if show:
        return
    if "transformers.utils.logging" in sys.modules:
        sys.modules["transformers.utils.logging"].disable_progress_bar()
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
