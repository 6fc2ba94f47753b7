"""``modelmux up``: the whole stack on one machine (embedded backends, modelsync, gateway).

Every backend listed in the config is started as an embedded backend, with modelsync (when the
gateway is configured to follow it); the gateway starts once they answer, so it never finds them
unreachable. A taken address stops ``up`` before it starts anything. Ctrl-C, SIGTERM or SIGHUP
stops all of them, gateway first so that it drains before its backends go; if ``up`` itself dies
(SIGKILL included), everything it started stops within seconds (modelmux_common/supervision.py).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelmux_common import supervision
from modelmux_common.config import Config, load
from modelmux_common.listen import ListenError, ensure_free

READY_TIMEOUT = 300.0
# How long a component other than the gateway gets to stop before it is killed.
STOP_GRACE = 20.0


@dataclass(frozen=True)
class Component:
    name: str  # as the messages call it: "gateway", "modelsync", "backend cpu-0"
    address: str  # where it listens; its health is checked there
    args: tuple[str, ...]  # modelmux's arguments


def components(config: Config, file: str, *, strict: bool = False) -> list[Component]:
    """What ``up`` starts, in order: backends, modelsync, then the gateway (last)."""
    parts = [
        Component(f"backend {b.name}", b.address, ("backend", "--config", file, "--name", b.name))
        for b in config.backends
    ]
    if config.gateway.modelsync:
        parts.append(Component("modelsync", config.modelsync.listen, ("sync", "--config", file)))
    gateway = ("gateway", "--config", file, *(("--strict",) if strict else ()))
    parts.append(Component("gateway", config.gateway.listen, gateway))
    return parts


def main(args: argparse.Namespace) -> int:
    config = load(args.config, daemon="gateway")  # it starts the gateway: its rules too
    parts = components(config, args.config, strict=getattr(args, "strict", False))
    busy = []
    for name, address in [(p.name, p.address) for p in parts] + _metrics_addresses(config):
        try:
            ensure_free(address)
        except ListenError as exc:
            busy.append(f"modelmux up: {name}: {exc}")
    if busy:
        print("\n".join(busy), file=sys.stderr)
        return 1
    running: list[tuple[Component, subprocess.Popen[bytes]]] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)
    try:
        *first, gateway = parts
        for group in (first, [gateway]):
            running += [(part, _spawn(part)) for part in group]
            for part in group:
                problem = _wait_serving(part, running, READY_TIMEOUT)
                if problem:
                    print(f"modelmux up: {problem}; stopping", file=sys.stderr)
                    return 1
        print(_banner(parts), flush=True)
        while True:
            for part, child in running:
                if child.poll() is not None:
                    print(
                        f"modelmux up: {part.name} exited ({_exit(child.returncode)}); "
                        "stopping the rest",
                        file=sys.stderr,
                    )
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    finally:
        _stop(running, gateway_grace=config.gateway.shutdown_grace + STOP_GRACE)


def _metrics_addresses(config: Config) -> list[tuple[str, str]]:
    """(component, address) of every /metrics endpoint the started components will serve."""
    found = [(f"backend {b.name} metrics", b.metrics_listen) for b in config.backends]
    if config.gateway.modelsync:
        found.append(("modelsync metrics", config.modelsync.metrics_listen))
    found.append(("gateway metrics", config.gateway.metrics_listen))
    return [(name, address) for name, address in found if address]


def _spawn(part: Component) -> subprocess.Popen[bytes]:
    return supervision.spawn([sys.executable, "-m", "modelmux_common.cli", *part.args])


def _wait_serving(
    part: Component, running: list[tuple[Component, subprocess.Popen[bytes]]], timeout: float
) -> str:
    """Waits until ``part`` says SERVING; what went wrong otherwise (a component exited)."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(part.address) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # the typed stub lacks its methods
        while time.monotonic() < deadline:
            for other, child in running:
                if child.poll() is not None:
                    return f"{other.name} exited ({_exit(child.returncode)}) while starting"
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return ""
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    return f"{part.name} did not become ready within {timeout:g} s"


def _stop(
    running: list[tuple[Component, subprocess.Popen[bytes]]], *, gateway_grace: float
) -> None:
    # children live in sessions of their own: a second Ctrl-C must not cut this short
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    for part, child in reversed(running):  # the gateway first: it drains before its backends go
        grace = gateway_grace if part.name == "gateway" else STOP_GRACE
        supervision.stop([child], grace=grace)


def _exit(code: int | None) -> str:
    if code is not None and code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


def _banner(parts: list[Component]) -> str:
    address = parts[-1].address
    listening = ", ".join(f"{part.name} {part.address}" for part in reversed(parts))
    return f"""
modelmux is SERVING on {address}. From another shell:

  grpcurl -plaintext {address} list
  grpcurl -plaintext -d '{{"model":"half_plus_two","json_inputs":{{"x":[1.0,2.0,5.0]}}}}' \\
      {address} modelmux.v1.Inference/Predict
  grpcurl -plaintext {address} modelmux.v1.Models/ListModels

modelmux up: SERVING ({listening}); Ctrl-C stops everything."""
