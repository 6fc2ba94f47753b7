"""Helpers for gateway tests: config files, an in-process gateway, waiting on health."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.server import Gateway
from modelmux_common import config as config_mod


def write_config(
    path: Path,
    *,
    models: Path,
    backends: list[dict[str, str]],
    gateway: dict[str, Any] | None = None,
    apis: list[dict[str, Any]] | None = None,
) -> Path:
    doc = {
        "gateway": {"listen": "127.0.0.1:0", "log_requests": True, **(gateway or {})},
        "backends": backends,
        "version_labels": {"half_plus_two": {"stable": 1, "canary": 2}},
        "apis": apis
        if apis is not None
        else [
            {
                "name": "half-plus-two",
                "handler": {
                    "type": "tensorflow",
                    "models": {
                        "paths": [{"name": "half_plus_two", "path": str(models / "half_plus_two")}]
                    },
                },
            },
            {
                "name": "iris",
                "handler": {"type": "tensorflow", "models": {"path": str(models / "iris")}},
            },
        ],
    }
    path.write_text(yaml.safe_dump(doc))
    return path


async def wait_for(predicate: Callable[[], Any], *, timeout: float, what: str) -> Any:
    """Polls an (a)sync predicate until truthy, failing with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def health_status(address: str, service: str = "") -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        except grpc.aio.AioRpcError:
            return -1
        return int(reply.status)


async def start_gateway(config_file: Path, *, timeout: float = 60.0) -> Gateway:
    """An in-process gateway, returned once its health says SERVING."""
    gateway = Gateway(config_mod.load(config_file))
    address = await gateway.start()

    async def serving() -> bool:
        return await health_status(address) == health_pb2.HealthCheckResponse.SERVING

    await wait_for(serving, timeout=timeout, what="gateway health SERVING")
    return gateway


def wait_serving(address: str, timeout: float = 120) -> None:
    """Until a gateway process's overall health is SERVING (every model routable, handlers up)."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, f"{address} never became SERVING"
            time.sleep(0.05)
