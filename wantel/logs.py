"""Logging, configured once for every wantel process.

:func:`configure_logging` is the single place wantel's processes set up logging: JSON lines when
the output is not a terminal (a log pipeline is reading) or when asked, a readable console
rendering on a terminal. The standard library's ``logging`` (the OpenTelemetry SDK, uvicorn)
is routed through the same renderer, so one process writes one format.
"""

from __future__ import annotations

import logging
import sys
from typing import Final, TextIO

import msgspec
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from exporters.logwriter import LineWriterFactory

_ENCODER: Final = msgspec.json.Encoder(enc_hook=str)


def _json_line(event_dict: EventDict, **_: object) -> str:
    """One JSON line: msgspec, ~3 µs a line less than ``json.dumps`` (``wantel serve`` writes
    about ten lifecycle lines a job), anything it cannot encode as ``str`` (as ``default=str``
    did), and NaN or infinity as ``null``: ``json.dumps`` wrote ``NaN``, which is not JSON."""
    return _ENCODER.encode(event_dict).decode()


LEVELS: Final = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
                 "error": logging.ERROR}
_HANDLER_MARK: Final = "_wantel_handler"


class _StampUnlessPresent:
    """ISO-8601 UTC ``timestamp``, unless the caller gave one (a lifecycle line carries the
    event's recorded time, not the time it was read)."""

    def __init__(self) -> None:
        self._stamper = structlog.processors.TimeStamper(fmt="iso", utc=True)

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> EventDict:
        if "timestamp" in event_dict:
            return event_dict
        return self._stamper(logger, name, event_dict)


def configure_logging(
    *,
    json: bool | None = None,
    level: str = "info",
    stream: TextIO | None = None,
    stdlib: bool = True,
) -> None:
    """Configure structlog (and, with ``stdlib``, the root ``logging`` handler) once.

    Args:
        json: JSON lines if True; console rendering if False; if None, JSON unless ``stream``
            is a terminal.
        level: the lowest level written (``debug``, ``info``, ``warning``, ``error``).
        stream: where lines go; ``sys.stderr`` by default, so stdout stays free for command
            output (``wantel cat`` prints events there).
        stdlib: also render standard-library log records (OpenTelemetry, uvicorn) the same way;
            calling again replaces the handler this function installed, never stacks another.
    """
    out = stream if stream is not None else sys.stderr
    as_json = json if json is not None else not _isatty(out)
    numeric = LEVELS.get(level.lower())
    if numeric is None:
        raise ValueError(f"log level {level!r}: expected one of {', '.join(LEVELS)}")
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _StampUnlessPresent(),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: Processor
    if as_json:
        shared.append(structlog.processors.dict_tracebacks)
        renderer = structlog.processors.JSONRenderer(serializer=_json_line)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=_isatty(out))
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # One write of the line and its newline, then a flush (print() wrote them apart,
        # ~0.3 µs a line more); a burst's lifecycle lines a step at once (exporters.logwriter).
        logger_factory=LineWriterFactory(file=out),
        cache_logger_on_first_use=False,
    )
    if stdlib:
        root = logging.getLogger()
        for handler in list(root.handlers):
            if getattr(handler, _HANDLER_MARK, False):
                root.removeHandler(handler)
        handler = logging.StreamHandler(out)
        handler.setFormatter(structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared]))
        setattr(handler, _HANDLER_MARK, True)
        root.addHandler(handler)
        root.setLevel(numeric)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real file
        return False


__all__ = ["LEVELS", "configure_logging"]
