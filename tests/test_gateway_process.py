"""The gateway as a real process: memory, no TensorFlow, backend failures, sockets, bad config."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import MODELMUX, ROOT, Proc, start_daemon
from gateway_helpers import start_gateway, wait_for, write_config

from gateway.fleet import discovery
from modelmux.v1 import inference_pb2, inference_pb2_grpc, models_pb2, models_pb2_grpc, tensor_pb2


def request() -> inference_pb2.PredictRequest:
    x = np.asarray([1.0, 2.0, 5.0], dtype="<f4")
    tensor = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[3], content=x.tobytes())
    return inference_pb2.PredictRequest(model="half_plus_two", inputs={"x": tensor})


async def answers(stub: inference_pb2_grpc.InferenceStub) -> bool:
    """True once the gateway answers half_plus_two from version 2 (for waits with a deadline)."""
    try:
        return (await stub.Predict(request(), timeout=5)).version == 2
    except grpc.aio.AioRpcError:
        return False


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

            await wait_for(lambda: answers(stub), timeout=60, what="the gateway process to answer")
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
            await wait_for(
                lambda: not gateway.fleet.table.routes, timeout=10, what="routes to drop"
            )
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


def test_bad_config_exits_2_with_message(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("gateway: {listne: x}\n")
    out = subprocess.run(
        [*MODELMUX, "gateway", "--config", str(cfg)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert str(cfg) in out.stderr and "gateway.listne" in out.stderr
    # the command-line flags are checked with the file: several workers on a unix socket
    cfg.write_text("gateway: {listen: '127.0.0.1:0'}\n")
    flags = ["--listen", f"unix:{tmp_path / 'g.sock'}", "--workers", "2"]
    out = subprocess.run(
        [*MODELMUX, "gateway", "--config", str(cfg), *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "gateway.listen: several workers need a TCP address" in out.stderr, out.stderr


async def test_overload_fails_fast_and_recovers(
    tmp_path: Path, example_models: Path, backend: Proc
) -> None:
    cfg = write_config(
        tmp_path / "modelmux.yaml",
        models=example_models,
        backends=[{"name": "cpu-0", "address": backend.address}],
        gateway={"backend_max_inflight": 1, "max_inflight": 2, "log_requests": False},
    )
    gateway = await start_gateway(cfg)
    big = np.ones(500_000, dtype="<f4")  # 2 MB: each call stays in flight for a while
    heavy = inference_pb2.PredictRequest(
        model="half_plus_two",
        inputs={
            "x": tensor_pb2.Tensor(
                dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[big.size], content=big.tobytes()
            )
        },
    )
    try:
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            started = time.monotonic()
            outcomes = await asyncio.gather(
                *(stub.Predict(heavy, timeout=30) for _ in range(30)), return_exceptions=True
            )
            errors = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
            assert errors and all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in errors), (
                errors[:3]
            )
            assert all("in-flight limit" in (e.details() or "") for e in errors)
            assert len(errors) < len(outcomes)  # the calls within the limits were served
            assert time.monotonic() - started < 20
            assert gateway.fleet.reconcilers[0].endpoint.outstanding == 0
            assert gateway.admission.inflight == 0
            assert (await stub.Predict(request(), timeout=10)).version == 2  # recovered
    finally:
        await gateway.stop()


async def test_sigterm_drains_calls_in_flight(
    tmp_path: Path, example_models: Path, backend: Proc
) -> None:
    cfg = write_config(
        tmp_path / "modelmux.yaml",
        models=example_models,
        backends=[{"name": "cpu-0", "address": backend.address}],
        gateway={"log_requests": True, "shutdown_grace": "10s"},
    )
    proc = start_daemon(["gateway", "--config", str(cfg)], timeout=60)
    big = np.ones(250_000, dtype="<f4")
    heavy = inference_pb2.PredictRequest(
        model="half_plus_two",
        inputs={
            "x": tensor_pb2.Tensor(
                dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[big.size], content=big.tobytes()
            )
        },
    )
    outcomes: list[tuple[float, float, grpc.StatusCode]] = []  # (start, end, code)
    details: list[str] = []
    async with grpc.aio.insecure_channel(proc.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)

        await wait_for(lambda: answers(stub), timeout=60, what="the gateway to answer")

        async def client() -> None:
            for _ in range(2000):
                begun = time.monotonic()
                try:
                    await stub.Predict(heavy, timeout=20)
                    code = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as exc:
                    code = exc.code()
                    details.append(f"{code.name}: {exc.details()}")
                outcomes.append((begun, time.monotonic(), code))
                if code != grpc.StatusCode.OK:
                    return

        clients = [asyncio.create_task(client()) for _ in range(6)]
        await wait_for(lambda: len(outcomes) >= 30, timeout=30, what="calls to flow")
        signalled = time.monotonic()
        proc.popen.terminate()
        await asyncio.wait_for(asyncio.gather(*clients), 30)
    assert await asyncio.to_thread(proc.popen.wait, 30) == 0  # exits by itself after the drain
    proc.stop()
    failed = [o for o in outcomes if o[2] != grpc.StatusCode.OK]
    assert failed, "the gateway never stopped accepting calls"
    # What the gateway accepted it finished: its own summary lines show every call either served
    # or refused at the door while draining, and the client saw exactly the served ones succeed.
    logged = [
        line
        for line in proc.lines
        if line.get("event") == "request" and line.get("rpc", "").endswith("Predict")
    ]
    statuses = {str(line["status"]) for line in logged}
    assert statuses <= {"OK", "UNAVAILABLE"}, statuses
    served = sum(1 for line in logged if line["status"] == "OK")
    assert (
        served == sum(1 for o in outcomes if o[2] == grpc.StatusCode.OK) + 1
    )  # + the readiness call
    # A call still uploading when the connection closed never reached a handler: the client sees
    # it refused (UNAVAILABLE), never half-run and never CANCELLED (tests/test_shutdown.py).
    assert all(code == grpc.StatusCode.UNAVAILABLE for _, _, code in failed), [
        d for d in details if not d.startswith("UNAVAILABLE")
    ]
    assert any("shutting down" in d for d in details), details
    # calls under way when the signal came were allowed to finish
    assert any(end > signalled and code == grpc.StatusCode.OK for _, end, code in outcomes)


async def test_dns_backend_entries_expand_to_every_address(
    tmp_path: Path, example_models: Path, backend: Proc, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = backend.address.rsplit(":", 1)[1]
    cfg = write_config(
        tmp_path / "modelmux.yaml",
        models=example_models,
        backends=[{"name": "pods", "address": f"dns:///localhost:{port}"}],
        gateway={"dns_refresh": "200ms"},
    )
    gateway = await start_gateway(cfg)
    try:
        names = set(gateway.fleet.names)
        assert f"pods/127.0.0.1:{port}" in names, names
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            reply = await inference_pb2_grpc.InferenceStub(channel).Predict(request(), timeout=10)
        assert reply.version == 2

        # A failing lookup keeps the backends it had. (The resolver failure is simulated: a real
        # one would need a DNS server off this machine.)
        async def failing(entry: object) -> dict[str, object]:
            raise OSError("temporary failure in name resolution")

        monkeypatch.setattr(discovery, "resolve", failing)
        await gateway.discovery.refresh()
        assert set(gateway.fleet.names) == names
    finally:
        await gateway.stop()


async def test_failed_version_load_is_reported_and_retried(
    tmp_path: Path, example_models: Path, backend: Proc
) -> None:
    model = tmp_path / "models" / "hpt_retry"
    shutil.copytree(example_models / "half_plus_two" / "1", model / "1")
    (model / "3").mkdir(parents=True)
    (model / "3" / "saved_model.pb").write_bytes(b"this is not a SavedModel")
    api = {
        "name": "retry",
        "handler": {
            "type": "tensorflow",
            "models": {"paths": [{"name": "hpt_retry", "path": str(model)}]},
        },
    }
    cfg = write_config(
        tmp_path / "modelmux.yaml",
        models=example_models,
        backends=[{"name": "cpu-0", "address": backend.address}],
        gateway={"status_interval": "200ms"},
        apis=[api],
    )
    gateway = await start_gateway(cfg)  # SERVING: version 1 serves while version 3 fails
    try:
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            models = models_pb2_grpc.ModelsStub(channel)
            stub = inference_pb2_grpc.InferenceStub(channel)

            async def version_3() -> models_pb2.ModelVersion | None:
                reply = await models.GetModel(
                    models_pb2.GetModelRequest(name="hpt_retry"), timeout=5
                )
                return next((v for v in reply.model.versions if v.version == 3), None)

            async def failed() -> bool:
                v3 = await version_3()
                return v3 is not None and any(b.error for b in v3.backends) and not v3.routable

            await wait_for(failed, timeout=30, what="version 3 reported as failed")
            hpt = inference_pb2.PredictRequest(model="hpt_retry", inputs=request().inputs)
            # the previous version keeps serving
            assert (await stub.Predict(hpt, timeout=10)).version == 1
            pinned = inference_pb2.PredictRequest(
                model="hpt_retry", version=3, inputs=request().inputs
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:  # failed: not worth retrying as is
                await stub.Predict(pinned, timeout=10)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()
            assert "version 3 failed to load on cpu-0" in str(info.value.details())
            assert "Wire format was corrupt" in str(info.value.details())
            # fix the files in place: the retry (with backoff) loads it without a restart
            shutil.rmtree(model / "3")
            shutil.copytree(example_models / "half_plus_two" / "2", model / "3")

            async def serves_3() -> bool:
                return (await stub.Predict(hpt, timeout=10)).version == 3

            await wait_for(serves_3, timeout=30, what="version 3 loaded on retry")
    finally:
        await gateway.stop()


async def test_workers_share_the_port(tmp_path: Path, example_models: Path, backend: Proc) -> None:
    cfg = write_config(
        tmp_path / "modelmux.yaml",
        models=example_models,
        backends=[{"name": "cpu-0", "address": backend.address}],
    )
    proc = start_daemon(["gateway", "--config", str(cfg), "--workers", "2"], timeout=60)
    try:
        # The kernel spreads connections, not calls: each channel gets its own connection (gRPC
        # shares connections between a process's channels unless told not to).
        for _ in range(16):
            options = [("grpc.use_local_subchannel_pool", 1)]
            async with grpc.aio.insecure_channel(proc.address, options=options) as channel:
                stub = inference_pb2_grpc.InferenceStub(channel)
                await wait_for(lambda s=stub: answers(s), timeout=60, what="an answer")
        served: set[object] = set()

        def both() -> bool:
            served.update(
                line.get("worker") for line in proc.lines if line.get("event") == "request"
            )
            return {0, 1} <= served

        await wait_for(both, timeout=10, what="both workers to serve")
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(children) == 2
    finally:
        assert proc.stop() == 0


async def test_route_only_gateway_leaves_backend_config_alone(
    tmp_path: Path, example_models: Path, backend: Proc
) -> None:
    """A sidecar (manage_backends: false) routes over what the managing gateway configured."""
    backends = [{"name": "cpu-0", "address": backend.address}]

    def applied() -> int:
        return sum(1 for line in backend.lines if line.get("event") == "model config applied")

    initial = applied()
    managing = await start_gateway(
        write_config(tmp_path / "m.yaml", models=example_models, backends=backends)
    )
    # the backend's log is read by another thread: wait for the managing gateway's push to show
    await wait_for(lambda: applied() > initial, timeout=10, what="the managing gateway's push")
    await managing.stop()  # the backend keeps the config it was given
    before = applied()
    sidecar_cfg = write_config(
        tmp_path / "s.yaml",
        models=example_models,
        backends=backends,
        gateway={"manage_backends": False},
    )
    sidecar = await start_gateway(sidecar_cfg)  # SERVING: it saw the managing gateway's models
    try:
        async with grpc.aio.insecure_channel(sidecar.address) as channel:
            reply = await inference_pb2_grpc.InferenceStub(channel).Predict(request(), timeout=10)
        assert reply.version == 2
        assert applied() == before  # the sidecar never pushed a config
    finally:
        await sidecar.stop()
