"""Progress bars on a terminal only: a log file (nohup, `> run.log 2>&1`) gets the phases' own lines.

tqdm redraws its bar with a carriage return on every update; written to a file that is hundreds of
KB of `\r` per phase. Off a terminal the bar is created disabled, so the code using it (iterating,
`.update`, `.set_postfix`, `with`) runs unchanged and prints nothing; pre-train logs a line per
epoch and meta-train one per validation instead.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable

from tqdm import tqdm

__all__ = ["progress_bar"]


def progress_bar(iterable: Iterable | None = None, **options: Any) -> tqdm:
    """`tqdm(iterable, **options)`, disabled unless its output (`file`, default stderr) is a terminal.

    An explicit `disable=True` (e.g. `disable=not is_main()`) still disables it on a terminal.
    """
    stream = options.get("file") or sys.stderr
    on_terminal = stream is not None and hasattr(stream, "isatty") and stream.isatty()
    options["disable"] = bool(options.get("disable")) or not on_terminal
    return tqdm(iterable, **options)
