"""Shared pieces of the modelsync tests: a real S3 endpoint (moto's server mode), a TCP proxy that
can stall a transfer, fake model trees, configs and in-process daemons."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from botocore.config import Config as BotoConfig

from modelmux_common.config import Config, load
from modelsync.daemon import Daemon
from modelsync.events import Event, EventKind

ROOT = Path(__file__).resolve().parent.parent
MOTO = str(Path(sys.executable).with_name("moto_server"))
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
_REQUEST = re.compile(
    r'"(?:\x1b\[[0-9;]*m)*([A-Z]+) (\S+) HTTP/[0-9.]+(?:\x1b\[[0-9;]*m)*" (\d{3})'
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, *, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@dataclasses.dataclass(frozen=True)
class Request:
    method: str
    path: str
    status: int

    @property
    def is_list(self) -> bool:
        return self.method == "GET" and "list-type=2" in self.path


class MotoServer:
    """``moto_server`` on loopback; every request it serves is read back from its log."""

    def __init__(self, log_dir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_dir / f"moto-{self.port}-{uuid.uuid4().hex[:6]}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoServer:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [MOTO, "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=log,
                env={**os.environ, **AWS_ENV},
            )
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def client(self) -> Any:
        return s3_client(self.endpoint)

    def _all_requests(self) -> list[Request]:
        text = self.log_path.read_text(errors="replace")
        return [Request(m, p, int(s)) for m, p, s in _REQUEST.findall(text)]

    def requests(self) -> list[Request]:
        """Every request served, in log order, without the markers of :meth:`settle`."""
        return [r for r in self._all_requests() if "/settle-" not in r.path]

    def settle(self, bucket: str, timeout: float = 10.0) -> int:
        """Makes a marker request and waits until the log shows it: every earlier request is
        logged by then. Returns the number of requests logged before the marker."""
        marker = f"settle-{uuid.uuid4().hex}"
        with contextlib.suppress(Exception):
            self.client().head_object(Bucket=bucket, Key=marker)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reqs = self._all_requests()
            for i, r in enumerate(reqs):
                if marker in r.path:
                    return sum(1 for q in reqs[:i] if "/settle-" not in q.path)
            time.sleep(0.02)
        raise TimeoutError("the S3 endpoint's log did not catch up")


def s3_client(endpoint: str) -> Any:
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=BotoConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


def object_gets(reqs: Iterable[Request], bucket: str) -> list[str]:
    """Paths of GetObject requests for ``bucket`` (listings excluded)."""
    return [
        r.path
        for r in reqs
        if r.method == "GET" and r.path.startswith(f"/{bucket}/") and "list-type" not in r.path
    ]


class StallingProxy:
    """A TCP proxy in front of the S3 endpoint that can stall responses after some bytes."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.stall_after: int | None = None
        self._epoch = 0
        self._released = asyncio.Event()
        self._released.set()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> StallingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stall(self, after_bytes: int) -> None:
        """Every connection delivers at most ``after_bytes`` more response bytes, then hangs."""
        self._epoch += 1
        self.stall_after = after_bytes
        self._released.clear()

    def release(self) -> None:
        self.stall_after = None
        self._released.set()

    async def close(self) -> None:
        self.release()
        for w in list(self._writers):
            w.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, stall=False),
                self._pipe(up_reader, writer, stall=True),
            )
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.close()

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, stall: bool
    ) -> None:
        epoch, sent = self._epoch, 0
        while data := await src.read(65536):
            if stall and self.stall_after is not None:
                if epoch != self._epoch:
                    epoch, sent = self._epoch, 0
                allowed = max(0, self.stall_after - sent)
                if len(data) > allowed:
                    dst.write(data[:allowed])
                    await dst.drain()
                    sent += allowed
                    data = data[allowed:]
                    await self._released.wait()
            dst.write(data)
            await dst.drain()
            sent += len(data)
        dst.close()


@contextlib.contextmanager
def aws_env() -> Iterator[None]:
    """Dummy credentials for the default credential chain of in-process daemons."""
    mp = pytest.MonkeyPatch()
    for key, value in AWS_ENV.items():
        mp.setenv(key, value)
    try:
        yield
    finally:
        mp.undo()


def moto_for_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """Body of a module-scoped fixture: one S3 endpoint, dummy credentials in the environment.
    Tests isolate themselves with their own bucket."""
    with aws_env():
        server = MotoServer(tmp_path_factory.mktemp("moto")).start()
        try:
            yield server
        finally:
            server.stop()


def new_bucket(moto: MotoServer) -> str:
    name = unique_bucket()
    moto.client().create_bucket(Bucket=name)
    return name


class SyncProcess:
    """``modelmux sync`` as a child process, its JSON log lines collected by a reader thread that
    also closes the pipe at EOF (so no file is left open however the process ends)."""

    def __init__(self, args: list[str], *, env: Mapping[str, str] | None = None) -> None:
        self.lines: list[dict[str, Any]] = []
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "modelmux_common.cli", *args],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "MODELMUX_LOG_FORMAT": "json", **(env or {})},
            cwd=ROOT,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stderr is not None
        with self.popen.stderr as stream:
            for raw in stream:
                with contextlib.suppress(ValueError):
                    self.lines.append(json.loads(raw))

    @property
    def pid(self) -> int:
        return self.popen.pid

    def logged(self, event: str, **fields: Any) -> dict[str, Any] | None:
        for line in list(self.lines):
            if line.get("event") == event and all(line.get(k) == v for k, v in fields.items()):
                return line
        return None

    async def serving(self, timeout: float = 60.0) -> str:
        """The address from the ``serving`` line, once the gRPC server accepts calls."""
        line = await wait_until(lambda: self.logged("serving"), timeout=timeout, what="serving")
        return str(line["address"])

    def finish(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        self._reader.join(timeout)
        return self.popen.returncode


# ---- model trees -------------------------------------------------------------------------


def cpu_model(tag: str, *, data: bytes | None = None) -> dict[str, bytes]:
    """The files of a CPU/GPU SavedModel version (content is fake: only names are validated)."""
    return {
        "saved_model.pb": f"graph {tag}".encode(),
        "variables/variables.index": f"index {tag}".encode(),
        "variables/variables.data-00000-of-00001": data or f"weights {tag}".encode(),
    }


def inf_model(tag: str) -> dict[str, bytes]:
    return {"saved_model.pb": f"neuron graph {tag}".encode()}


def put_tree(s3: Any, bucket: str, prefix: str, files: Mapping[str, bytes]) -> None:
    for rel, body in files.items():
        s3.put_object(Bucket=bucket, Key=prefix + rel, Body=body)


def delete_prefix(s3: Any, bucket: str, prefix: str) -> None:
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=prefix)
    for obj in listing.get("Contents", []):
        s3.delete_object(Bucket=bucket, Key=obj["Key"])


def write_tree(root: Path, files: Mapping[str, bytes]) -> None:
    for rel, body in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)


def prefixed(prefix: str, files: Mapping[str, bytes]) -> dict[str, bytes]:
    return {prefix + rel: body for rel, body in files.items()}


# ---- configs and daemons -----------------------------------------------------------------


def api(name: str, models: dict[str, Any], *, inf: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": name, "handler": {"type": "tensorflow", "models": models}}
    if inf:
        spec["compute"] = {"inf": 1}
    return spec


def write_config(folder: Path, apis: list[dict[str, Any]], **modelsync: Any) -> tuple[Path, Config]:
    """A modelmux YAML with fast test timings; returns its path and the loaded config."""
    section = {
        "target": str(folder / "target"),
        "listen": "127.0.0.1:0",
        "poll_interval": "0.2s",
        "removal_grace": "0.5s",
        "debounce": "0.1s",
        "settle": "0s",
        "stall_timeout": "5s",
        "progress_interval": "0.5s",
        **modelsync,
    }
    path = folder / "modelmux.yaml"
    path.write_text(yaml.safe_dump({"modelsync": section, "apis": apis}))
    return path, load(path)


@contextlib.asynccontextmanager
async def running(config: Config) -> AsyncIterator[Daemon]:
    """modelsync in this process: gRPC on a free loopback port, sync loops running."""
    daemon = Daemon(config, config.modelsync)
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop()


async def wait_until(
    check: Callable[[], Any], *, timeout: float = 10.0, what: str = "condition"
) -> Any:
    """Polls ``check`` until it returns something truthy; fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


def events(daemon: Daemon, *, after: int = 0) -> list[Event]:
    return [e for e in daemon.syncer.events.retained() if e.revision > after]


async def wait_event(
    daemon: Daemon,
    kind: EventKind,
    *,
    model: str = "",
    version: int | None = None,
    after: int = 0,
    timeout: float = 10.0,
) -> Event:
    def find() -> Event | None:
        for e in events(daemon, after=after):
            model_ok = not model or e.model == model
            if e.kind is kind and model_ok and (version is None or e.version == version):
                return e
        return None

    found: Event = await wait_until(find, timeout=timeout, what=f"{kind.value} {model} {version}")
    return found


async def ticks_pass(daemon: Daemon, count: int, *, timeout: float = 10.0) -> None:
    """Waits until every source completed ``count`` more ticks."""
    start = [r.health.ticks for r in daemon.syncer.runners]

    def done() -> bool:
        return all(
            r.health.ticks >= s + count for r, s in zip(daemon.syncer.runners, start, strict=True)
        )

    await wait_until(done, timeout=timeout, what=f"{count} ticks")


def tree(target: Path) -> dict[str, bytes]:
    """What a reader of the view sees: <model>/<version>/<path> -> content (through symlinks)."""
    out: dict[str, bytes] = {}
    for model_dir in sorted(p for p in target.iterdir() if not p.name.startswith(".")):
        for version_dir in sorted(model_dir.iterdir()):
            for file in sorted(version_dir.rglob("*")):
                if file.is_file():
                    out[
                        f"{model_dir.name}/{version_dir.name}/{file.relative_to(version_dir).as_posix()}"
                    ] = file.read_bytes()
    return out


def unique_bucket() -> str:
    return f"models-{uuid.uuid4().hex[:12]}"
