"""``modelmux up``: the whole stack on one machine (embedded backends, modelsync, gateway).

Every backend listed in the config is started as an embedded backend, then modelsync (when the
gateway is configured to follow it), then the gateway. Ctrl-C or SIGTERM stops all of them,
gateway first so that it drains before its backends go.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from types import FrameType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelmux_common.config import load

READY_TIMEOUT = 300.0


def _spawn(*args: str) -> subprocess.Popen[bytes]:
    # a session of its own: a terminal's Ctrl-C reaches only this process, which then stops the
    # gateway first (it drains) and its backends after it
    return subprocess.Popen(
        [sys.executable, "-m", "modelmux_common.cli", *args], start_new_session=True
    )


def _wait_serving(address: str, children: list[subprocess.Popen[bytes]], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # the typed stub lacks its methods
        while time.monotonic() < deadline:
            if any(c.poll() is not None for c in children):
                return False
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    return False


def _stop(children: list[subprocess.Popen[bytes]]) -> None:
    # children live in sessions of their own: a second Ctrl-C must not cut this loop short
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    for child in children:  # newest first: the gateway drains before its backends stop
        if child.poll() is None:
            child.terminate()
        try:
            child.wait(20)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def main(args: argparse.Namespace) -> int:
    config = load(args.config)
    children: list[subprocess.Popen[bytes]] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)
    try:
        for backend in config.backends:
            children.insert(0, _spawn("backend", "--config", args.config, "--name", backend.name))
        if config.gateway.modelsync:
            children.insert(0, _spawn("sync", "--config", args.config))
        strict = ["--strict"] if getattr(args, "strict", False) else []
        children.insert(0, _spawn("gateway", "--config", args.config, *strict))
        address = config.gateway.listen
        if not _wait_serving(address, children, READY_TIMEOUT):
            print("modelmux up: the stack did not become ready; stopping", file=sys.stderr)
            return 1
        print(_banner(address), flush=True)
        while all(c.poll() is None for c in children):
            time.sleep(0.5)
        print("modelmux up: a component exited; stopping the rest", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        _stop(children)


def _banner(address: str) -> str:
    return f"""
modelmux is SERVING on {address}. From another shell:

  grpcurl -plaintext {address} list
  grpcurl -plaintext -d '{{"model":"half_plus_two","json_inputs":{{"x":[1.0,2.0,5.0]}}}}' \\
      {address} modelmux.v1.Inference/Predict
  grpcurl -plaintext {address} modelmux.v1.Models/ListModels

Ctrl-C stops everything.
"""
