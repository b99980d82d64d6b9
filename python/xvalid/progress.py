"""Progress bars for long work, drawn on stderr so stdout stays clean for results."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                           TimeRemainingColumn, TransferSpeedColumn)

stderr_console = Console(stderr=True, highlight=False, soft_wrap=True,
                         width=None if sys.stderr.isatty() else 180)

# Below this much data the work takes well under a second: no bar.
MIN_BYTES_FOR_BAR = 32 << 20


@contextlib.contextmanager
def byte_progress(label: str, total_bytes: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yields advance(nbytes). The bar is transient and only shown for large work on a terminal."""
    if not enabled or total_bytes < MIN_BYTES_FOR_BAR:
        yield lambda nbytes: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=stderr_console, transient=True) as bar:
        task = bar.add_task(label, total=total_bytes)
        yield lambda nbytes: bar.advance(task, nbytes)
