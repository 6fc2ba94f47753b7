"""structlog set-up: JSON lines in production, console on a TTY."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog


def configure(*, level: str = "info", json: bool | None = None) -> None:
    """Configure structlog once per process.

    ``json`` defaults to JSON lines unless stderr is a TTY; ``MODELMUX_LOG_FORMAT=json|console``
    overrides the guess.
    """
    fmt = os.environ.get("MODELMUX_LOG_FORMAT", "")
    if json is None:
        json = fmt == "json" or (fmt != "console" and not sys.stderr.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        # One write per line (message and newline together): print() writes them separately, and
        # with PYTHONUNBUFFERED each piece is its own syscall, so TensorFlow's C++ logging on
        # another thread could land between a JSON line and its newline.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
