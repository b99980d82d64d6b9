"""The live view on stderr while the grid runs: on a terminal, the rows measured so far and a
progress bar with the ETA (weighted by each cell's work); elsewhere (CI logs) one line per
finished cell. stdout gets only the final table."""

from __future__ import annotations

from rich.console import Group
from rich.live import Live
from rich.progress import (BarColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table

from ..progress import stderr_console
from .output import STATUS_STYLE, STATUS_TEXT
from .rows import Row, format_ms, format_rate

SHOWN_ROWS = 12  # the latest rows on screen; the final table has them all


class LiveView:
    def __init__(self, console=stderr_console):
        self.console = console
        self.interactive = console.is_terminal
        self.rows: list[Row] = []
        self.live: Live | None = None
        self.cells_done = 0
        self.cells_total = 0

    def start(self, result) -> None:
        self.cells_total = result.cells_total
        if not self.interactive:
            return
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 TaskProgressColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), console=self.console)
        self.task = self.progress.add_task("starting", total=None)  # known once a model loads
        self.live = Live(self._render(), console=self.console, transient=True,
                         refresh_per_second=4)
        self.live.start()

    def set_total(self, total_work: float) -> None:
        if self.live is not None:
            self.progress.update(self.task, total=total_work)

    def status(self, text: str) -> None:
        if self.live is not None:
            self.progress.update(self.task, description=f"[{self.cells_done}/{self.cells_total}] "
                                 f"{text}")

    def cell_done(self, rows: list[Row], work: float) -> None:
        self.cells_done += 1
        self.rows.extend(rows)
        if self.live is None:
            for row in rows:
                self.console.print(f"[{self.cells_done}/{self.cells_total}] {_line(row)}")
            return
        self.progress.advance(self.task, work)
        self.live.update(self._render())

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

    def _render(self):
        table = Table(title="measured so far (the full table follows)", title_justify="left")
        for column in ("backend", "B", "S", "N", "threads", "valid", "prefill ms",
                       "decode ms/tok", "prefill tok/s", "decode tok/s"):
            table.add_column(column, justify="left" if column in ("backend", "valid") else "right")
        for row in self.rows[-SHOWN_ROWS:]:
            table.add_row(row.label, str(row.batch), str(row.seq), str(row.gen),
                          str(row.threads),
                          f"[{STATUS_STYLE[row.status]}]{STATUS_TEXT[row.status]}[/]",
                          format_ms(row.median("prefill_ms")), format_ms(row.median("decode_ms_per_token")),
                          format_rate(row.prefill_tok_s), format_rate(row.decode_tok_s))
        return Group(table, self.progress) if self.rows else self.progress


def _line(row: Row) -> str:
    where = f"{row.label} B{row.batch} S{row.seq} N{row.gen} t{row.threads}"
    if row.status != "ok":
        return f"{where}: {STATUS_TEXT[row.status]} ({row.reason})"
    return (f"{where}: prefill {format_ms(row.median('prefill_ms'))} ms, decode "
            f"{format_ms(row.median('decode_ms_per_token'))} ms/token")
