"""The processes a benchmark run measures: started on free loopback ports, read through /proc, stopped.

Every child writes its log to a file in the run's temporary folder (the harness never has to drain
a pipe), is told to die with the harness (``PR_SET_PDEATHSIG``), and is stopped with SIGTERM, then
SIGKILL, when the run ends, whether it ends normally, on an exception or on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent
MODELMUX = [sys.executable, "-m", "modelmux_common.cli"]
CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1
MIB = 1024 * 1024


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the harness goes away."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(address: str, timeout: float) -> None:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, int(port)), 0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {address} after {timeout}s") from None
            time.sleep(0.02)


# ---- /proc ---------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            children.setdefault(int(_stat_fields(int(entry))[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, []))
    return out


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of the processes (all their threads), in seconds."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError):
            fields = _stat_fields(pid)
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def memory_mib(pids: Sequence[int], key: str = "VmRSS") -> float:
    """Summed ``key`` (VmRSS: resident now; VmHWM: peak resident) of the processes, in MiB."""
    total_kb = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    total_kb += int(line.split()[1])
    return total_kb / 1024


# ---- children ------------------------------------------------------------------------------------


class Child:
    """One process of the stack, its log in a file, its address once it serves."""

    def __init__(
        self, name: str, argv: Sequence[str], *, logdir: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.address = ""
        # seconds from start to the serving line, and to health SERVING (gateways)
        self.listening = 0.0
        self.ready = 0.0
        self.log_path = logdir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.started = time.monotonic()
        self.popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "MODELMUX_LOG_FORMAT": "json", "TF_CPP_MIN_LOG_LEVEL": "2"}
            | (env or {}),
            cwd=ROOT,
            preexec_fn=_die_with_parent,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def pids(self) -> list[int]:
        return descendants(self.pid)

    def cpu(self) -> float:
        return cpu_seconds(self.pids())

    def cpu_own(self) -> float:
        """CPU seconds of this process alone, without its child processes."""
        return cpu_seconds([self.pid])

    def rss(self, key: str = "VmRSS") -> float:
        return memory_mib(self.pids(), key)

    def rss_own(self, key: str = "VmRSS") -> float:
        return memory_mib([self.pid], key)

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for raw in self.log_path.read_bytes().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(raw)
                if isinstance(entry, dict):
                    out.append(entry)
        return out

    def tail(self, lines: int = 15) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def wait_log(
        self, match: Callable[[dict[str, Any]], bool], *, timeout: float, what: str
    ) -> Any:
        """The first JSON log line ``match`` accepts; fails early when the process exits."""
        deadline = time.monotonic() + timeout
        while True:
            for entry in self.log_lines():
                if match(entry):
                    return entry
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.popen.returncode}):\n{self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no {what} after {timeout}s:\n{self.tail()}")
            time.sleep(0.01)

    def wait_serving(self, timeout: float) -> str:
        entry = self.wait_log(
            lambda e: e.get("event") == "serving" and bool(e.get("address")),
            timeout=timeout,
            what="serving line",
        )
        self.address = str(entry["address"])
        return self.address

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        self._log.close()


def health_serving(address: str, *, timeout: float) -> float:
    """Waits until grpc.health.v1 says SERVING; returns the monotonic time it did."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            with contextlib.suppress(grpc.RpcError):
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.monotonic()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not SERVING after {timeout}s")
            time.sleep(0.01)


# ---- configuration files -------------------------------------------------------------------------


API = "half-plus-two"  # the API every config of a run declares (bench_requests.API)


def models_api(
    source: Path | str, handler: Path | None = None, batching: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The API serving half_plus_two from ``source``; with ``handler``, a TensorFlow handler file
    (``handler.path``) that ``modelmux.v1.Inference/Invoke`` runs in a handler worker process;
    with ``batching``, its ``server_side_batching``."""
    spec: dict[str, Any] = {
        "type": "tensorflow",
        "models": {"paths": [{"name": "half_plus_two", "path": str(source)}]},
    }
    if handler is not None:
        spec["path"] = str(handler)
    if batching:
        spec["server_side_batching"] = batching
    return {"name": API, "kind": "RealtimeAPI", "handler": spec}


def gateway_config(
    path: Path,
    *,
    backend: str,
    source: Path | str,
    max_bytes: int,
    log_requests: bool,
    handler: Path | None = None,
    batching: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    doc = {
        "gateway": {
            "listen": "127.0.0.1:0",
            "log_requests": log_requests,
            "max_message_bytes": max_bytes,
            **(extra or {}),
        },
        "backends": [{"name": "cpu-0", "address": backend, "accelerator": "cpu"}],
        "apis": [models_api(source, handler, batching)],
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def modelsync_config(
    path: Path,
    *,
    source: Path | str,
    target: Path,
    settle: str,
    debounce: str,
    extra: dict[str, Any] | None = None,
) -> Path:
    doc = {
        "modelsync": {
            "listen": "127.0.0.1:0",
            "target": str(target),
            "settle": settle,
            "debounce": debounce,
            **(extra or {}),
        },
        "apis": [models_api(source)],
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def model_config_file(path: Path, *, source: Path, versions: Sequence[int]) -> Path:
    """The ModelServerConfig (text format) a gateway reading ``source`` would send a backend."""
    wanted = " ".join(f"versions: {v}" for v in versions)
    path.write_text(
        f'model_config_list {{ config {{ name: "{source.name}" base_path: "{source}"'
        f' model_platform: "tensorflow" model_version_policy {{ specific {{ {wanted} }} }} }} }}\n'
    )
    return path


NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/nginx-error.log warn;
{user}
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    client_max_body_size 0;
    client_body_buffer_size {buffer}m;
    upstream backend {{ server {backend}; keepalive 64; }}
    server {{
        listen {listen} http2;
        http2_max_concurrent_streams 1024;
        location / {{
            grpc_pass grpc://backend;
            grpc_buffer_size {buffer}m;
            grpc_read_timeout 120s;
            grpc_send_timeout 120s;
        }}
    }}
}}
"""


def nginx_conf(prefix: Path, *, backend: str, listen: str, max_bytes: int) -> Path:
    """A grpc_pass hop with upstream keep-alive (otherwise nginx dials the backend per call)."""
    user = "user root root;" if os.geteuid() == 0 else ""
    conf = prefix / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            prefix=prefix,
            user=user,
            backend=backend,
            listen=listen,
            buffer=max(1, max_bytes // MIB),
        )
    )
    return conf


# ---- the stack -----------------------------------------------------------------------------------


class Stack:
    """Owns the children of one run; ``close`` stops them in reverse start order."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.logdir = workdir / "logs"
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []
        self._sink: http.server.ThreadingHTTPServer | None = None

    def spawn(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Child:
        child = Child(name, argv, logdir=self.logdir, env=env)
        self.children.append(child)
        return child

    def backends(
        self,
        names: Mapping[str, Path | None],
        *,
        extra_args: Sequence[str] = (),
        timeout: float = 180.0,
    ) -> dict[str, Child]:
        """Embedded backends, started together (TensorFlow takes seconds to import); each name
        maps to a model config file loaded at start, or None."""
        argv = [
            *MODELMUX,
            "backend",
            "--listen",
            "127.0.0.1:0",
            "--accelerator",
            "cpu",
            *extra_args,
        ]
        children = {
            name: self.spawn(name, argv + (["--model-config-file", str(conf)] if conf else []))
            for name, conf in names.items()
        }
        for child in children.values():
            child.wait_serving(timeout)
        return children

    def gateway(
        self,
        name: str,
        config: Path,
        *,
        timeout: float = 120.0,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> Child:
        """A gateway process, returned once its health says SERVING.

        Sets ``child.listening`` (start to the ``serving`` line) and ``child.ready`` (start to
        health SERVING, which includes the backend loading the models it was told to).
        """
        argv = [*MODELMUX, "gateway", "--config", str(config), *extra_args]
        child = self.spawn(name, argv, env=env)
        child.wait_serving(timeout)
        listening = time.monotonic()
        ready = health_serving(child.address, timeout=timeout)
        child.listening = listening - child.started
        child.ready = ready - child.started
        return child

    def barehop(
        self, *, backend: str, max_bytes: int, loop: str = "asyncio", timeout: float = 60.0
    ) -> Child:
        argv = [
            sys.executable,
            str(SCRIPTS / "bench_barehop.py"),
            "--listen",
            "127.0.0.1:0",
            "--backend",
            backend,
            "--max-message-bytes",
            str(max_bytes),
            "--loop",
            loop,
        ]
        child = self.spawn("barehop" if loop == "asyncio" else f"barehop-{loop}", argv)
        child.wait_serving(timeout)
        return child

    def nginx(self, *, backend: str, max_bytes: int, timeout: float = 30.0) -> Child | None:
        """nginx with grpc_pass in front of the backend; None when nginx is not installed."""
        binary = shutil.which("nginx")
        if binary is None:
            return None
        prefix = self.workdir / "nginx"
        (prefix / "body").mkdir(parents=True, exist_ok=True)
        listen = f"127.0.0.1:{free_port()}"
        conf = nginx_conf(prefix, backend=backend, listen=listen, max_bytes=max_bytes)
        child = self.spawn("nginx", [binary, "-e", "stderr", "-p", str(prefix), "-c", str(conf)])
        wait_port(listen, timeout)
        child.address = listen
        return child

    def modelsync(
        self,
        config: Path,
        *,
        name: str = "modelsync",
        timeout: float = 60.0,
        env: dict[str, str] | None = None,
    ) -> Child:
        child = self.spawn(name, [*MODELMUX, "sync", "--config", str(config)], env=env)
        child.wait_serving(timeout)
        return child

    def discard(self, child: Child) -> None:
        """Stops one child before the end of the run."""
        if child in self.children:
            self.children.remove(child)
        child.stop()

    def otlp_sink(self) -> str:
        """An OTLP/HTTP endpoint on loopback that takes every export and keeps nothing (a thread
        of this process: the spans' cost to the gateway is what is measured)."""
        if self._sink is None:

            class Sink(http.server.BaseHTTPRequestHandler):
                def do_POST(self) -> None:
                    self.rfile.read(int(self.headers.get("Content-Length", 0)))
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

                def log_message(self, format: str, *args: Any) -> None:
                    return

            self._sink = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
            threading.Thread(target=self._sink.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._sink.server_port}"

    def close(self) -> None:
        if self._sink is not None:
            self._sink.shutdown()
            self._sink.server_close()
            self._sink = None
        while self.children:
            child = self.children.pop()
            with contextlib.suppress(Exception):
                child.stop()
