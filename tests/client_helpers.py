"""Helpers for the Python client's tests: a gateway process in front of the shared backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from async_helpers import recorder_api
from conftest import Proc, start_daemon
from gateway_helpers import wait_serving, write_config

HANDLERS = Path(__file__).parent / "handlers"

# One input per dtype of the dtypes model (scripts/make_models.py), each output named the same.
NUMERIC_DTYPES = (
    "float32",
    "float64",
    "float16",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "bool",
)


def client_apis(models: Path) -> list[dict[str, Any]]:
    """half_plus_two (labels stable -> 1, canary -> 2), the dtypes model, a Python handler."""
    return [
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
            "name": "dtypes",
            "handler": {"type": "tensorflow", "models": {"path": str(models / "dtypes")}},
        },
        {"name": "echo", "handler": {"type": "python", "path": str(HANDLERS / "faulty.py")}},
    ]


def start_client_gateway(
    folder: Path,
    *,
    models: Path,
    backend: Proc,
    gateway: dict[str, Any] | None = None,
    args: tuple[str, ...] = (),
) -> Proc:
    """A gateway process serving ``client_apis`` and the AsyncAPI ``recorder``, returned once its health says SERVING."""
    config = write_config(
        folder / "modelmux.yaml",
        models=models,
        backends=[{"name": "cpu-0", "address": backend.address}],
        gateway={"status_interval": "200ms", "shutdown_grace": "2s", **(gateway or {})},
        apis=[
            *client_apis(models),
            recorder_api(
                "recorder",
                folder / "async.log",
                store={"folder": str(folder / "async"), "max_attempts": 2},
            ),
        ],
    )
    proc = start_daemon(["gateway", "--config", str(config), *args], timeout=90)
    try:
        wait_serving(proc.address, timeout=90)
    except BaseException:
        proc.stop()
        raise
    return proc
