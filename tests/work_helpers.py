"""Shared pieces of the work-layer tests: both backends behind one fixture (embedded in a tmp
folder; SQS + S3 on moto's server over loopback HTTP), and child processes that use them."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from modelsync_helpers import AWS_ENV, ROOT, MotoServer, moto_for_module, new_bucket
from work_child import open_backend

from gateway.work import Work

CHILD = Path(__file__).with_name("work_child.py")
KINDS = ["embedded", "aws"]


@dataclass
class Backend:
    """A backend under test and what a child process needs to open the same one."""

    kind: str
    work: Work
    spec: dict[str, Any]
    # A visibility timeout that lapses soon: SQS counts whole seconds, the embedded queue any.
    tick: float

    async def reopen(self) -> Work:
        return await open_backend(self.spec)


def moto_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    yield from moto_for_module(tmp_path_factory)


@contextlib.asynccontextmanager
async def backend_for(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """The backend ``request.param`` names, fresh for one test."""
    if request.param == "embedded":
        spec: dict[str, Any] = {"kind": "embedded", "folder": str(tmp_path / "state")}
        tick = 0.3
    else:
        moto: MotoServer = request.getfixturevalue("moto")
        spec = {
            "kind": "aws",
            "endpoint": moto.endpoint,
            "bucket": new_bucket(moto),
            "prefix": "work",
            "queue_prefix": f"t{uuid.uuid4().hex[:8]}-",
        }
        tick = 1.0
    work = await open_backend(spec)
    try:
        yield Backend(request.param, work, spec, tick)
    finally:
        await work.close()


@dataclass
class Child:
    """``work_child.py`` as a real process; its stdout lines collected by a reader thread."""

    popen: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    def read(self) -> None:
        assert self.popen.stdout is not None
        with self.popen.stdout as out:
            for line in out:
                self.lines.append(line.strip())

    def said(self, word: str) -> list[list[str]]:
        return [line.split()[1:] for line in list(self.lines) if line.split()[:1] == [word]]

    def tell(self, line: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(10)
        if self.popen.stdin is not None:
            self.popen.stdin.close()

    def finish(self, timeout: float = 60.0) -> int:
        return self.popen.wait(timeout)


def start_child(spec: dict[str, Any], role: str, *args: str) -> Child:
    popen = subprocess.Popen(
        [sys.executable, str(CHILD), json.dumps(spec), role, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **AWS_ENV},
        cwd=ROOT,
    )
    child = Child(popen)
    threading.Thread(target=child.read, daemon=True).start()
    return child
