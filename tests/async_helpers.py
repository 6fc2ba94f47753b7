"""Shared pieces of the Async API tests: configs, gateway processes, the recorder's log."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from conftest import Proc, start_daemon
from modelsync_helpers import AWS_ENV

from modelmux.client import Client, NotFoundError
from modelmux.client.calls import AsyncRequest

HANDLERS = Path(__file__).parent / "handlers"
RECORDER = str(HANDLERS / "async_recorder.py")


def recorder_api(
    name: str, log: Path, *, store: dict[str, Any], processes: int = 1, threads: int = 1, **async_
) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "AsyncAPI",
        "handler": {
            "type": "python",
            "path": RECORDER,
            "config": {"log": str(log)},
            "processes_per_replica": processes,
            "threads_per_process": threads,
        },
        "async": {**store, **async_},
    }


def write_config(
    path: Path, apis: list[dict[str, Any]], *, backend: str = "", **gateway: Any
) -> Path:
    doc: dict[str, Any] = {
        "gateway": {
            "listen": "127.0.0.1:0",
            "state_dir": str(path.parent / "state"),
            "shutdown_grace": "2s",
            "status_interval": "200ms",
            **gateway,
        },
        "backends": [{"name": "cpu", "address": backend}] if backend else [],
        "apis": apis,
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def start_gateway(config: Path) -> Proc:
    """``modelmux gateway`` as a real process (AWS test credentials in its environment)."""
    return start_daemon(["gateway", "--config", str(config)], env=dict(AWS_ENV))


def kill(proc: Proc) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.popen.wait(10)


def runs(log: Path) -> list[tuple[str, str, int, int]]:
    """The recorder's lines: (what, request id, gateway pid, worker pid)."""
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        parts = line.split()
        if len(parts) == 4:
            out.append((parts[0], parts[1], int(parts[2]), int(parts[3])))
    return out


def counts(log: Path, what: str) -> Counter[str]:
    return Counter(rid for w, rid, _, _ in runs(log) if w == what)


def wait_until(predicate: Callable[[], Any], *, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def all_ended(client: Client, ids: list[str], *, timeout: float) -> dict[str, AsyncRequest]:
    """Every request's final state, waiting (bounded) until each has one."""
    ended: dict[str, AsyncRequest] = {}

    def check() -> bool:
        for rid in ids:
            if rid in ended:
                continue
            try:
                request = client.get(rid, timeout=10)
            except NotFoundError:
                continue
            if request.done:
                ended[rid] = request
        return len(ended) == len(ids)

    wait_until(check, timeout=timeout, what=f"{len(ids)} requests to end")
    return ended
