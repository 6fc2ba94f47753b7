"""The fast tier (`make test-fast`): pure code in one process. Nothing here may start a process,
reach past loopback or import TensorFlow; the guards below fail a test that tries."""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest


def _refuse_process(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("a unit test started a process: it belongs in tests/, not tests/unit/")


def _loopback_only(connect: Any) -> Any:
    def guarded(self: socket.socket, address: Any) -> Any:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0]
            if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
                raise AssertionError(f"a unit test connected to {host}: loopback only")
        return connect(self, address)

    return guarded


@pytest.fixture(autouse=True)
def _pure(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # in a whole-suite run other tests have imported them already: only new imports count
    before = set(sys.modules)
    monkeypatch.setattr(subprocess.Popen, "_execute_child", _refuse_process)
    monkeypatch.setattr(socket.socket, "connect", _loopback_only(socket.socket.connect))
    yield
    loaded = sorted(
        m for m in set(sys.modules) - before if m.split(".")[0] in ("tensorflow", "backend")
    )
    assert not loaded, f"the unit tier imported {loaded[:5]}"
