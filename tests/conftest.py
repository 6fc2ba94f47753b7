"""Shared fixtures: real SavedModels written by TensorFlow, and real daemons on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parent.parent
MODELMUX = [sys.executable, "-m", "modelmux_common.cli"]

# derandomized and without an example database: the same examples on every run and in CI
settings.register_profile(
    "modelmux", max_examples=200, deadline=None, derandomize=True, database=None
)
settings.load_profile("modelmux")


@pytest.fixture(scope="session")
def example_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example models (half_plus_two v1/v2, iris v1), written once per session by TensorFlow."""
    out = tmp_path_factory.mktemp("models")
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_models.py"), "--out", str(out)],
        check=True,
        timeout=300,
    )
    return out


@dataclass
class Proc:
    """A modelmux daemon running as a real child process, with its JSON log lines collected."""

    popen: subprocess.Popen[str]
    address: str
    lines: list[dict[str, object]] = field(default_factory=list)
    drain: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self, timeout: float = 15.0) -> int:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        if self.drain is not None:
            self.drain.join(timeout)
        return self.popen.returncode


def parse_log_line(raw: str) -> dict[str, object] | None:
    """One JSON log line. TensorFlow's C++ logging writes to the same stderr in several pieces, so
    a JSON line can land right after a half-written C++ prefix: parse from the first brace then."""
    start = raw.find('{"')
    if start < 0:
        return None
    try:
        entry = json.loads(raw[start:])
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


def _read_until_serving(stream: IO[str], lines: list[dict[str, object]], deadline: float) -> str:
    other: list[str] = []  # the last lines that are not JSON (a traceback, a config error)
    while time.monotonic() < deadline:
        raw = stream.readline()
        if not raw:
            break
        entry = parse_log_line(raw)
        if entry is None:
            other = [*other[-30:], raw.rstrip()]
            continue
        lines.append(entry)
        if entry.get("event") == "serving" and entry.get("address"):
            return str(entry["address"])
    raise RuntimeError(
        f"process did not report serving; log so far: {lines[-20:]}; other output: {other[-30:]}"
    )


def start_daemon(
    args: list[str],
    *,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
    command: Sequence[str] = MODELMUX,
) -> Proc:
    """Starts ``modelmux ARGS`` (``command``: this venv's, or another's ``bin/modelmux``) and
    waits (bounded) for its ``serving`` log line."""
    full_env = {**os.environ, "MODELMUX_LOG_FORMAT": "json", **(env or {})}
    popen = subprocess.Popen(
        [*command, *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=full_env,
        cwd=ROOT,
    )
    lines: list[dict[str, object]] = []
    assert popen.stderr is not None
    try:
        address = _read_until_serving(popen.stderr, lines, time.monotonic() + timeout)
    except BaseException:
        popen.kill()
        popen.wait()
        popen.stderr.close()
        raise

    # Keep draining the log so the child never blocks on a full pipe; close it at EOF.
    def drain() -> None:
        assert popen.stderr is not None
        with popen.stderr:
            for raw in popen.stderr:
                entry = parse_log_line(raw)
                if entry is not None:
                    lines.append(entry)

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    return Proc(popen, address, lines, thread)


@pytest.fixture(scope="session")
def backend(example_models: Path) -> Iterator[Proc]:
    """One embedded backend (cpu) on a free loopback port, shared by the session."""
    proc = start_daemon(["backend", "--listen", "127.0.0.1:0", "--accelerator", "cpu"])
    yield proc
    proc.stop()
