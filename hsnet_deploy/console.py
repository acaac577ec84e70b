"""Shared terminal output: one rich console on stderr for progress and messages, tables on stdout."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable

from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table


def _width(stream, piped: int) -> int | None:
    """None (rich asks the terminal, or reads COLUMNS) on a terminal or when COLUMNS is set; else, for CI logs
    and pipes, `piped` columns: wide enough that the bench table does not fold its columns."""
    columns = os.environ.get("COLUMNS", "")
    return None if stream.isatty() or (columns.isdigit() and int(columns) > 0) else piped


class ReaderMayLeave:
    """The tables' stdout, as `sys.stdout` is at each write. When the reader has gone (`| head`), the rest of the
    output is dropped (fd 1 goes to /dev/null) and the command goes on: its --json file, report and exit status
    are what they would have been, where a write error would end it, and click would exit 1 without a word."""

    def write(self, text: str) -> int:
        try:
            return sys.stdout.write(text)
        except BrokenPipeError:
            self._drop()
            return len(text)

    def flush(self) -> None:
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            self._drop()

    @staticmethod
    def _drop() -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)

    def __getattr__(self, name: str):  # isatty, fileno, encoding: the stream's own
        return getattr(sys.stdout, name)


err = Console(stderr=True, highlight=False, width=_width(sys.stderr, 140))
out = Console(file=ReaderMayLeave(), highlight=False, width=_width(sys.stdout, 160))


def progress_bar(transient: bool = False, console: Console | None = None, enabled: bool = True) -> Progress:
    """The one progress bar: description, bar, n/total, elapsed, eta, and the task's `status` field."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
        console=console or err, transient=transient, disable=not enabled,
    )


def table(title: str, columns: Iterable[str], rows: Iterable[Iterable[object]], width: int | None = None) -> Table:
    """A compact table (a rule under the header, no side borders) so short labels fit 80 columns. A label too
    long for the line (a dataset's class name) is cut with an ellipsis: the figures keep their columns."""
    columns = list(columns)
    cells = [["-" if v is None else number(v) if isinstance(v, float) else str(v) for v in row] for row in rows]
    figures = sum(max([len(col)] + [len(row[i]) for row in cells]) + COLUMN_GAP for i, col in enumerate(columns) if i)
    label_width = max(MIN_LABEL_WIDTH, (width or out.width) - figures)
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for i, col in enumerate(columns):
        if i == 0:
            t.add_column(col, justify="left", no_wrap=True, overflow="ellipsis", max_width=label_width)
        else:
            t.add_column(col, justify="right")
    for row in cells:
        t.add_row(*row)
    return t


COLUMN_GAP = 3  # the spaces rich puts between two columns of `table`
MIN_LABEL_WIDTH = 16  # below it, rich wraps the figures' headers instead


def number(value: float) -> str:
    """A table cell: 3-4 significant digits, never an exponent for the sizes tables hold (1695, 53.9, 0.452)."""
    size = abs(value)
    if size >= 100 or value == 0:
        return f"{value:.0f}"
    if size >= 10:
        return f"{value:.1f}"
    if size >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def versus(value: object, limit: object) -> str:
    """A figure shown beside its threshold, with the digits that keep them apart: 0.99894 against 0.999 must not
    read as 0.999 (nor 0.9999996 as 1), or a failed check would look passed."""
    if not isinstance(value, int | float) or not isinstance(limit, int | float) or isinstance(value, bool):
        return "-" if value is None else str(value)
    def side(x: float) -> int:
        return (x > limit) - (x < limit)

    for digits in range(4, 13):
        text = f"{value:.{digits}f}"
        if side(float(text)) == side(value):  # shown on the same side of the limit as it is
            return text
    return repr(value)


def kv_table(title: str, rows: Iterable[tuple[str, object]]) -> Table:
    """Two left-aligned columns, name and value: a record (an artifact's facts, this machine's) at a glance."""
    t = Table(title=title, title_justify="left", show_header=False)
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    for name, value in rows:
        t.add_row(name, "-" if value is None else str(value))
    return t


def dumps(obj: object) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
