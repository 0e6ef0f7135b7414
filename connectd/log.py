"""Diagnostics: structlog configured in one place.

JSON lines when stderr is not a terminal (journald, files, CI), a readable console rendering
when it is. Daemons bind `daemon`, `stream`, `campaign`; one summary line per unit of work.
Diagnostic logs are not data: data goes through the event logs (connectd.spool).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def configure(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    """Set up structlog (and the stdlib root logger, for libraries) once per process."""
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if getattr(stream, "isatty", lambda: False)() else "json"
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        # WriteLogger: the line and its newline in one write (print() makes two, and daemons
        # sharing one log file under `connectd up` then interleave lines)
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(_LEVELS.get(level, logging.INFO), logging.WARNING),
                        stream=stream, format="%(levelname)s %(name)s: %(message)s", force=True)


def get(**bind: Any) -> Any:
    """A structlog logger with the given context bound."""
    return structlog.get_logger().bind(**bind)
