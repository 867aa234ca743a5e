"""Where structlog's lines are written: one write and one flush a line, or a step's lines at
once.

:class:`LineWriter` is structlog's ``WriteLogger`` (the line and its newline in one write,
then a flush: a log pipeline tailing the file sees each line whole, as it is written), except
on a thread inside :func:`held_lines`: there its lines are kept, and written when the block
ends, in order, in one write and one flush. ``wantel serve``'s lifecycle log holds the lines
of each step the runner applies: a burst writes tens of thousands of lines, and a write
system call each cost 1.3–1.7 µs a line (to ``/dev/null``, a pipe, a file), held by 35 0.3–0.5.

Kept apart from :mod:`exporters.logs` so that configuring logging
(:func:`wantel.logs.configure_logging`) imports nothing else.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import structlog

_HELD = threading.local()


class LineWriter(structlog.WriteLogger):
    """structlog's ``WriteLogger``, whose lines wait for the end of a :func:`held_lines`
    block on the thread that writes them."""

    def __init__(self, file: TextIO | None = None) -> None:
        super().__init__(file)
        #: Where lines go (held lines are grouped by it: a lazy ``get_logger`` makes a
        #: writer a call).
        self.file = file or sys.stdout  # as WriteLogger resolves it

    def __setstate__(self, state: Any) -> None:
        """Unpickled (only a writer to ``sys.stdout`` or ``sys.stderr`` pickles)."""
        super().__setstate__(state)
        self.file = sys.stdout if state == "stdout" else sys.stderr

    def msg(self, message: str) -> None:
        """Write ``message`` and a newline and flush; inside :func:`held_lines`, keep it."""
        held: list[tuple[LineWriter, str]] | None = getattr(_HELD, "lines", None)
        if held is None:
            super().msg(message)
        else:
            held.append((self, message))

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class LineWriterFactory:
    """Makes :class:`LineWriter` s to ``file``: structlog's ``logger_factory``."""

    def __init__(self, file: TextIO | None = None) -> None:
        self._file = file

    def __call__(self, *args: Any) -> LineWriter:
        return LineWriter(self._file)


@contextmanager
def held_lines() -> Iterator[None]:
    """Keep the lines :class:`LineWriter` s write on this thread until the block ends, then
    write them in order: each run of lines to one file as one write and one flush (under the
    file's lock, so no other thread's line lands inside it). Written even if the block
    raises; a block inside another one leaves them to the outer one."""
    if getattr(_HELD, "lines", None) is not None:
        yield
        return
    held: list[tuple[LineWriter, str]] = []
    _HELD.lines = held
    try:
        yield
    finally:
        _HELD.lines = None
        _write(held)


def _write(held: list[tuple[LineWriter, str]]) -> None:
    """Each run of lines to one file in one ``WriteLogger.msg`` (a write and a flush)."""
    start = 0
    for index in range(1, len(held) + 1):
        if index == len(held) or held[index][0].file is not held[start][0].file:
            writer = held[start][0]
            structlog.WriteLogger.msg(writer, "\n".join(m for _, m in held[start:index]))
            start = index


__all__ = ["LineWriter", "LineWriterFactory", "held_lines"]
