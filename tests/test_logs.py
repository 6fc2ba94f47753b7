"""The per-request line writer writes what structlog would, one write per line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys
    import structlog
    from modelmux_common import logs

    logs.configure(level=sys.argv[1], json=sys.argv[2] == "json", component="gateway")
    structlog.contextvars.bind_contextvars(worker=3)
    fields = dict(rpc="a/Predict", request_id="r-1", model="m", version=2, status="OK", ms=1.5)
    structlog.get_logger("t").info("request", **fields)
    logs.hot_info("t")("request", **fields)
    """
)


def _lines(level: str, fmt: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, level, fmt],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stderr.splitlines()


def test_hot_info_writes_structlogs_json_line() -> None:
    lines = _lines("info", "json")
    assert len(lines) == 2, lines
    theirs, ours = (json.loads(line) for line in lines)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", ours["timestamp"])
    del theirs["timestamp"], ours["timestamp"]
    assert list(ours.items()) == list(theirs.items())  # same keys, values and order
    assert ours["worker"] == 3 and ours["event"] == "request"
    assert ours["component"] == "gateway"  # which process wrote it, on every line


def test_hot_info_follows_the_level_and_the_console_format() -> None:
    assert _lines("warning", "json") == []
    console = _lines("info", "console")
    assert len(console) == 2 and all("request" in line and "r-1" in line for line in console)
    assert all(re.search(r"\] gateway +request ", line) for line in console), console
