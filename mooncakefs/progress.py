"""One progress bar helper for long work (the demo's replay, a node's repair pass).

A bar is drawn on stderr only when stderr is a terminal: output piped to a file or a log stays free of
carriage returns and partial lines, so callers that run unattended log a summary line instead.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO

import click


def on_terminal(stream: IO[str] | None = None) -> bool:
    """Whether ``stream`` (default: stderr) is a terminal, i.e. whether a bar would be drawn."""
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


@contextmanager
def progress(total: int, label: str, stream: IO[str] | None = None) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``: a bar of ``total`` steps on stderr if it is a terminal; else a no-op."""
    stream = sys.stderr if stream is None else stream
    if not on_terminal(stream) or total <= 0:
        yield lambda n=1: None
        return
    with click.progressbar(length=total, label=label, file=stream, show_pos=True, show_eta=True) as bar:
        yield bar.update
