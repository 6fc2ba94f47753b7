"""structlog set-up: JSON lines in production, console on a TTY."""

from __future__ import annotations

import datetime
import json as jsonlib
import logging
import os
import sys
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import structlog

_settings: dict[str, Any] = {"json": False, "level": logging.INFO, "every_line": {}}
COMPONENT_WIDTH = 13  # the console's component column ("backend cpu-0")


def configure(
    *,
    level: str = "info",
    json: bool | None = None,
    component: str = "",
    fields: Mapping[str, Any] | None = None,
) -> None:
    """Configure structlog once per process.

    ``json`` defaults to JSON lines unless stderr is a TTY; ``MODELMUX_LOG_FORMAT=json|console``
    overrides the guess. ``component`` (``gateway``, ``modelsync``, ``backend cpu-0``, ...) goes
    on every line, so a terminal or a log store that mixes several processes' lines tells them
    apart: a ``component`` field in JSON, a column after the level on the console. ``fields``
    go on every line too, from any thread (context variables are per thread: gRPC's call threads
    start with none); a context variable or a field of the line of the same name wins.
    """
    fmt = os.environ.get("MODELMUX_LOG_FORMAT", "")
    if json is None:
        json = fmt == "json" or (fmt != "console" and not sys.stderr.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else _console(colors=sys.stderr.isatty())
    )
    every_line = {**({"component": component} if component else {}), **(fields or {})}
    _settings.update(
        json=json, level=logging.getLevelNamesMapping()[level.upper()], every_line=every_line
    )

    def add_fields(logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
        for key, value in every_line.items():
            event.setdefault(key, value)
        return event

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_fields,
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


def _console(*, colors: bool) -> structlog.dev.ConsoleRenderer:
    """structlog's console renderer with the component in a column of its own after the level."""
    renderer = structlog.dev.ConsoleRenderer(colors=colors)
    columns = renderer.columns
    at = next(i for i, c in enumerate(columns) if c.key == "level") + 1
    plain = structlog.dev.KeyValueColumnFormatter(
        key_style=None, value_style="", reset_style="", value_repr=str, width=COMPONENT_WIDTH
    )
    renderer.columns = [*columns[:at], structlog.dev.Column("component", plain), *columns[at:]]
    return renderer


def hot_info(logger: str) -> Callable[..., None]:
    """``structlog.get_logger(logger).info`` for a line written on every request.

    With JSON lines it writes the same line without structlog's processor chain: one
    ``json.dumps`` and one write, with the context variables bound when it was made (the worker
    index): about 10 µs a line instead of 16 (written to a file). Console output goes through
    structlog.
    """
    if not _settings["json"]:
        info: Callable[..., None] = structlog.get_logger(logger).info
        return info
    if _settings["level"] > logging.INFO:
        return lambda event, **fields: None
    context = structlog.contextvars.get_contextvars()
    every_line: Mapping[str, Any] = _settings["every_line"]
    encode = jsonlib.JSONEncoder().encode  # json.dumps' defaults, as structlog's JSONRenderer
    now = datetime.datetime.now
    utc = datetime.UTC
    write = sys.stderr.write

    def line(event: str, **fields: Any) -> None:
        fields["event"] = event
        for key, value in context.items():  # a field wins over a context variable, as in structlog
            fields.setdefault(key, value)
        for key, value in every_line.items():
            fields.setdefault(key, value)
        fields["level"] = "info"
        fields["timestamp"] = now(utc).isoformat().replace("+00:00", "Z")
        write(encode(fields) + "\n")

    return line
