"""The gateway as a real process: memory, no TensorFlow, backend failures, sockets, bad config."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import MODELMUX, ROOT, Proc, start_daemon
from gateway_helpers import start_gateway, wait_for, write_config

from modelmux.v1 import inference_pb2, inference_pb2_grpc, tensor_pb2
from modelmux_common.config import ConfigError, load


def request() -> inference_pb2.PredictRequest:
    x = np.asarray([1.0, 2.0, 5.0], dtype="<f4")
    tensor = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[3], content=x.tobytes())
    return inference_pb2.PredictRequest(model="half_plus_two", inputs={"x": tensor})


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def test_gateway_process_is_small_and_tensorflow_free(
    tmp_path: Path, example_models: Path, backend: Proc
) -> None:
    cfg = write_config(
        tmp_path / "modelmux.yaml",
        models=example_models,
        backends=[{"name": "cpu-0", "address": backend.address}],
        gateway={"log_requests": False},
    )
    started = time.monotonic()
    proc = start_daemon(["gateway", "--config", str(cfg)], timeout=60)
    try:
        async with grpc.aio.insecure_channel(proc.address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)

            async def answers() -> bool:
                try:
                    return (await stub.Predict(request(), timeout=5)).version == 2
                except grpc.aio.AioRpcError:
                    return False

            await wait_for(answers, timeout=60, what="the gateway process to answer")
            ready = time.monotonic() - started
            for _ in range(200):
                await stub.Predict(request(), timeout=5)
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "libtensorflow" not in maps and "_pywrap_tensorflow" not in maps
        rss = rss_mb(proc.pid)
        print(f"gateway RSS after 200 calls: {rss:.1f} MB; start to first answer {ready:.2f} s")
        assert rss < 100, f"gateway RSS {rss:.1f} MB"
    finally:
        assert proc.stop() == 0
    assert any(line.get("event") == "stopped" for line in proc.lines)


def test_gateway_module_imports_no_tensorflow() -> None:
    code = "import sys, gateway.server; print(sorted(m for m in sys.modules if m == 'tensorflow' or m.startswith('tensorflow.python')))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]"


async def test_backend_down_fails_fast_then_recovers(tmp_path: Path, example_models: Path) -> None:
    spare = start_daemon(["backend", "--listen", "127.0.0.1:0"])
    cfg = write_config(
        tmp_path / "modelmux.yaml",
        models=example_models,
        backends=[{"name": "spare", "address": spare.address}],
        gateway={"backend_timeout": "5s", "status_interval": "200ms"},
    )
    gateway = await start_gateway(cfg)
    try:
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            assert (await stub.Predict(request(), timeout=10)).version == 2
            spare.popen.kill()
            spare.popen.wait()
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Predict(request(), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
            assert time.monotonic() - started < 5
            # Once the reconciler notices, calls fail at once with the reason, still UNAVAILABLE.
            await wait_for(lambda: not gateway.pool.table.routes, timeout=10, what="routes to drop")
            with pytest.raises(grpc.aio.AioRpcError) as again:
                await stub.Predict(request(), timeout=10)
            assert again.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "no version available" in (again.value.details() or "")
    finally:
        await gateway.stop()


async def test_unix_socket_listen(tmp_path: Path, example_models: Path, backend: Proc) -> None:
    sock = tmp_path / "gw.sock"
    cfg = write_config(
        tmp_path / "modelmux.yaml",
        models=example_models,
        backends=[{"name": "cpu-0", "address": backend.address}],
        gateway={"listen": f"unix:{sock}"},
    )
    gateway = await start_gateway(cfg)
    try:
        async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
            reply = await inference_pb2_grpc.InferenceStub(channel).Predict(request(), timeout=10)
            assert reply.version == 2
    finally:
        await gateway.stop()


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("gateway: {listne: x}", "gateway.listne", "unknown key"),
        ("gateway: {backend_timeout: soon}", "gateway.backend_timeout", "not a duration"),
        ("backends: [{address: 'a:1', accelerator: tpu}]", "backends[0].accelerator", "'tpu'"),
        (
            "apis: [{name: a, handler: {type: tensorflow}}]",
            "apis[0].handler.models",
            "one of path, paths, dir",
        ),
        (
            "apis: [{name: a, handler: {type: tensorflow, models: {path: x, dir: y}}}]",
            "apis[0].handler.models",
            "exactly one",
        ),
        (
            "apis: [{name: a, handler: {type: tensorflow, models: {path: x, cache_size: 2}}}]",
            "apis[0].handler.models",
            "cache_size and disk_cache_size",
        ),
        ("apis: [{name: 'a b', handler: {models: {path: x}}}]", "apis[0].name", "not a valid name"),
        (
            "apis: [{name: a, handler: {models: {path: 'http://x'}}}]",
            "apis[0].handler.models.path",
            "s3://",
        ),
    ],
)
def test_bad_config_names_file_key_reason(tmp_path: Path, text: str, key: str, reason: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(cfg)
    assert info.value.file == str(cfg) and info.value.key == key and reason in info.value.reason, (
        str(info.value)
    )


def test_bad_config_exits_2_with_message(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("gateway: {listne: x}\n")
    out = subprocess.run(
        [*MODELMUX, "gateway", "--config", str(cfg)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert str(cfg) in out.stderr and "gateway.listne" in out.stderr


def test_environment_overrides_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("gateway: {listen: '127.0.0.1:1', backend_timeout: 3s}\n")
    monkeypatch.setenv("MODELMUX_GATEWAY_LISTEN", "127.0.0.1:2")
    config = load(cfg)
    assert config.gateway.listen == "127.0.0.1:2" and config.gateway.backend_timeout == 3.0
