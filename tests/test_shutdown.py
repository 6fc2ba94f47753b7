"""SIGTERM under steady load: every call the clients start is answered or refused, none lost."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import Proc, start_daemon
from gateway_helpers import wait_for, wait_serving, write_config

from modelmux.v1 import inference_pb2, models_pb2, tensor_pb2
from modelmux_common.tfserving import predict_pb2, types_pb2

GRACE = 2.0


def _typed() -> bytes:
    x = np.asarray([1.0, 2.0, 5.0], dtype="<f4")
    tensor = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[3], content=x.tobytes())
    return inference_pb2.PredictRequest(
        model="half_plus_two", inputs={"x": tensor}
    ).SerializeToString()


def _facade() -> bytes:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "half_plus_two"
    request.inputs["x"].dtype = types_pb2.DT_FLOAT
    request.inputs["x"].tensor_shape.dim.add().size = 3
    request.inputs["x"].float_val.extend([1.0, 2.0, 5.0])
    return bytes(request.SerializeToString())


CALLS = (
    ("/modelmux.v1.Inference/Predict", _typed()),
    ("/tensorflow.serving.PredictionService/Predict", _facade()),
    ("/modelmux.v1.Models/ListModels", models_pb2.ListModelsRequest().SerializeToString()),
)


def _gateway(tmp_path: Path, example_models: Path, backend: Proc) -> Proc:
    cfg = write_config(
        tmp_path / "modelmux.yaml",
        models=example_models,
        backends=[{"name": "cpu-0", "address": backend.address}],
        gateway={"log_requests": False, "shutdown_grace": f"{GRACE}s"},
    )
    proc = start_daemon(["gateway", "--config", str(cfg)], timeout=60)
    wait_serving(proc.address, timeout=60)
    return proc


async def _exited(proc: Proc, timeout: float) -> float:
    """Seconds from now until the process exits (failing after ``timeout``)."""
    started = time.monotonic()
    await wait_for(
        lambda: proc.popen.poll() is not None, timeout=timeout, what="the gateway to exit"
    )
    return time.monotonic() - started


async def test_sigterm_under_steady_load_loses_no_call(
    tmp_path: Path, example_models: Path, backend: Proc
) -> None:
    proc = _gateway(tmp_path, example_models, backend)
    counts: collections.Counter[str] = collections.Counter()
    details: collections.Counter[str] = collections.Counter()
    channels = [grpc.aio.insecure_channel(proc.address) for _ in range(4)]
    try:
        stubs = [(ch.unary_unary(path), data) for ch in channels for path, data in CALLS]
        watch = channels[0].unary_stream("/modelmux.v1.Models/WatchModels")(
            models_pb2.WatchModelsRequest().SerializeToString(), timeout=30
        )
        await watch.read()  # the stream is open: it must end with a status too

        async def one(index: int) -> None:
            call, data = stubs[index % len(stubs)]
            try:
                await call(data, timeout=10)
                counts["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                counts[exc.code().name] += 1
                details[f"{exc.code().name}: {(exc.details() or '')[:80]}"] += 1

        # open loop: a call every 2 ms whatever the answers, from 1 s before the signal until
        # 0.5 s after the process is gone
        tasks: list[asyncio.Task[None]] = []
        started = time.monotonic()
        signalled = exited = 0.0
        while not exited or time.monotonic() < exited + 0.5:
            tasks.append(asyncio.create_task(one(len(tasks))))
            now = time.monotonic()
            if not signalled and now - started > 1.0:
                proc.popen.send_signal(signal.SIGTERM)
                signalled = now
            if signalled and not exited and proc.popen.poll() is not None:
                exited = now
            assert now - started < 20, f"the gateway did not exit: {proc.lines[-5:]}"
            await asyncio.sleep(0.002)
        await asyncio.gather(*tasks)
        watch_code = await watch.code()
    finally:
        for channel in channels:
            await channel.close()
        code = proc.stop()
    print(dict(counts), dict(details), f"exit after {exited - signalled:.3f} s")
    assert code == 0
    assert set(counts) <= {"OK", "UNAVAILABLE"}, details  # never CANCELLED, never anything else
    assert counts["OK"] > 100 and counts["UNAVAILABLE"] > 100, counts
    assert watch_code == grpc.StatusCode.UNAVAILABLE, await watch.details()
    assert exited - signalled < GRACE


async def test_exit_within_shutdown_grace_while_a_call_outlasts_it(
    tmp_path: Path, example_models: Path
) -> None:
    stuck = start_daemon(["backend", "--listen", "127.0.0.1:0", "--accelerator", "cpu"])
    proc = _gateway(tmp_path, example_models, stuck)
    try:
        async with grpc.aio.insecure_channel(proc.address) as channel:
            call = channel.unary_unary(CALLS[0][0])
            os.kill(stuck.pid, signal.SIGSTOP)  # the backend holds every call from now on
            try:
                pending = asyncio.ensure_future(call(CALLS[0][1], timeout=30))
                await asyncio.sleep(0.3)
                assert not pending.done()
                proc.popen.send_signal(signal.SIGTERM)
                seconds = await _exited(proc, timeout=GRACE + 5)
                with pytest.raises(grpc.aio.AioRpcError):
                    await pending
            finally:
                os.kill(stuck.pid, signal.SIGCONT)
    finally:
        proc.stop()
        stuck.stop()
    assert seconds < GRACE, f"exit took {seconds:.2f} s, more than shutdown_grace ({GRACE} s)"
