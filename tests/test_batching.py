"""Server-side batching (gateway/batching.py): concurrent Predict calls share one backend call and
each caller still gets exactly its own rows back. A real embedded backend of this module's own
(it serves the ``total`` and ``single`` models, which the session's backend does not) behind an
in-process gateway."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import structlog.testing
from conftest import Proc, start_daemon
from gateway_helpers import start_gateway, wait_for, write_config

from gateway.server import Gateway
from gateway.tensors import proto_to_numpy
from modelmux.v1 import inference_pb2, inference_pb2_grpc
from modelmux_common.tfserving import predict_pb2, tensor_pb2

from backend.tfserving import prediction_service_pb2_grpc  # isort: skip

IRIS = ("sepal_length", "sepal_width", "petal_length", "petal_width")
OFFSET = {1: 2.0, 2: 3.0}  # half_plus_two: y = 0.5 x + offset


def floats(values: list[float]) -> tensor_pb2.TensorProto:
    tensor = tensor_pb2.TensorProto(dtype=1)  # DT_FLOAT
    tensor.tensor_shape.dim.add(size=len(values))
    tensor.tensor_content = np.asarray(values, dtype="<f4").tobytes()
    return tensor


def request(model: str, inputs: dict[str, list[float]], version: int | None = None) -> Any:
    out = predict_pb2.PredictRequest()
    out.model_spec.name = model
    if version is not None:
        out.model_spec.version.value = version
    for name, values in inputs.items():
        out.inputs[name].CopyFrom(floats(values))
    return out


def values(tensor: Any) -> np.ndarray[Any, Any]:
    return proto_to_numpy(tensor)


def api(name: str, models: dict[str, Any], batching: dict[str, Any] | None) -> dict[str, Any]:
    handler: dict[str, Any] = {"type": "tensorflow", "models": models}
    if batching is not None:
        handler["server_side_batching"] = batching
    return {"name": name, "handler": handler}


@pytest.fixture(scope="module")
def own_backend(example_models: Path) -> Iterator[Proc]:
    proc = start_daemon(["backend", "--listen", "127.0.0.1:0", "--accelerator", "cpu"])
    yield proc
    proc.stop()


def apis(m: Path) -> list[dict[str, Any]]:
    return [
        api(
            "half-plus-two",
            {"paths": [{"name": "half_plus_two", "path": str(m / "half_plus_two")}]},
            {"max_batch_size": 8},
        ),
        api("iris", {"path": str(m / "iris")}, {"max_batch_size": 4}),
        api("total", {"path": str(m / "total")}, {"max_batch_size": 8}),
        # half_plus_two under another name, with a long interval: batches wait to fill
        api(
            "patient",
            {"paths": [{"name": "patient", "path": str(m / "half_plus_two")}]},
            {"max_batch_size": 4, "batch_interval": "300ms"},
        ),
        # one row per call: the backend refuses every batch
        api(
            "single", {"path": str(m / "single")}, {"max_batch_size": 4, "batch_interval": "300ms"}
        ),
    ]


@pytest.fixture(scope="module")
async def gateway(
    tmp_path_factory: pytest.TempPathFactory, example_models: Path, own_backend: Proc
) -> AsyncIterator[Gateway]:
    cfg = write_config(
        tmp_path_factory.mktemp("batching") / "modelmux.yaml",
        models=example_models,
        backends=[{"name": "cpu-0", "address": own_backend.address, "accelerator": "cpu"}],
        apis=apis(example_models),
    )
    gw = await start_gateway(cfg)
    yield gw
    await gw.stop()


@pytest.fixture
async def stub(gateway: Gateway) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        yield prediction_service_pb2_grpc.PredictionServiceStub(channel)


def batches(logged: list[dict[str, Any]], model: str) -> list[int]:
    return [e["batch"] for e in logged if e["event"] == "request" and e["model"] == model]


async def test_concurrent_calls_share_backend_calls_and_get_their_own_rows(stub: Any) -> None:
    # 60 calls at once, 1 to 3 rows each, for v1, v2 and latest (v2)
    calls = [([float(i), i + 0.5, -i][: 1 + i % 3], (1, 2, None)[i % 3]) for i in range(60)]
    with structlog.testing.capture_logs() as logged:
        replies = await asyncio.gather(
            *(stub.Predict(request("half_plus_two", {"x": x}, v), timeout=30) for x, v in calls)
        )
    for (x, version), reply in zip(calls, replies, strict=True):
        expected = np.asarray(x, dtype=np.float32) * 0.5 + OFFSET[version or 2]
        assert values(reply.outputs["y"]).tolist() == expected.tolist()
        assert reply.model_spec.name == "half_plus_two"
        assert reply.model_spec.version.value == (version or 2)
    sizes = batches(logged, "half_plus_two")
    assert len(sizes) == 60 and max(sizes) > 1 and max(sizes) <= 8, sizes


async def test_a_lone_call_goes_at_once_unbatched(stub: Any) -> None:
    with structlog.testing.capture_logs() as logged:
        reply = await stub.Predict(request("half_plus_two", {"x": [4.0]}), timeout=10)
    assert values(reply.outputs["y"]).tolist() == [5.0]
    assert batches(logged, "half_plus_two") == [1]


async def test_several_inputs_and_outputs_split_by_rows(stub: Any, own_backend: Proc) -> None:
    rng = np.random.default_rng(7)
    inputs = [
        {name: rng.uniform(0, 7, size=1 + i % 4).round(1).tolist() for name in IRIS}
        for i in range(24)
    ]
    with structlog.testing.capture_logs() as logged:
        replies = await asyncio.gather(
            *(stub.Predict(request("iris", x), timeout=30) for x in inputs)
        )
    async with grpc.aio.insecure_channel(own_backend.address) as channel:
        direct = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for x, reply in zip(inputs, replies, strict=True):
            alone = await direct.Predict(request("iris", x), timeout=30)
            for name in ("class_ids", "probabilities"):
                got, want = values(reply.outputs[name]), values(alone.outputs[name])
                assert got.shape == want.shape == (len(x["petal_length"]), *want.shape[1:])
                np.testing.assert_allclose(got, want, rtol=1e-6)
    assert max(batches(logged, "iris")) > 1


async def test_own_api_json_calls_are_batched_too(gateway: Gateway) -> None:
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        inference = inference_pb2_grpc.InferenceStub(channel)
        calls = []
        for i in range(30):
            req = inference_pb2.PredictRequest(model="half_plus_two", version=1)
            req.json_inputs.update({"x": [float(i)]})
            calls.append(inference.Predict(req, timeout=30))
        with structlog.testing.capture_logs() as logged:
            replies = await asyncio.gather(*calls)
    for i, reply in enumerate(replies):
        assert reply.json_outputs["y"] == [i * 0.5 + 2.0]
    assert max(batches(logged, "half_plus_two")) > 1


async def test_outputs_without_the_batch_dimension_turn_batching_off(stub: Any) -> None:
    # two lengths of x: two groups, one decision for the model
    xs = [[float(i), 1.0][: 1 + i % 2] for i in range(20)]
    with structlog.testing.capture_logs() as logged:
        replies = await asyncio.gather(
            *(stub.Predict(request("total", {"x": x}), timeout=30) for x in xs)
        )
        again = await asyncio.gather(
            *(stub.Predict(request("total", {"x": x}), timeout=30) for x in xs)
        )
    for x, reply, second in zip(xs, replies, again, strict=True):
        assert values(reply.outputs["total"]).item() == sum(x)
        assert values(second.outputs["total"]).item() == sum(x)
    off = [e for e in logged if e["event"] == "batching_off"]
    assert len(off) == 1 and off[0]["model"] == "total", off
    assert set(batches(logged, "total")) == {1}


async def test_batch_interval_waits_for_a_fuller_batch(stub: Any) -> None:
    with structlog.testing.capture_logs() as logged:
        loop = asyncio.get_running_loop()
        started = loop.time()
        two = await asyncio.gather(
            *(stub.Predict(request("patient", {"x": [float(i)]}), timeout=10) for i in range(2))
        )
        waited = loop.time() - started
        started = loop.time()
        four = await asyncio.gather(
            *(stub.Predict(request("patient", {"x": [float(i)]}), timeout=10) for i in range(4))
        )
        full = loop.time() - started
    assert [values(r.outputs["y"]).tolist() for r in two] == [[3.0], [3.5]]
    assert [values(r.outputs["y"]).item() for r in four] == [3.0, 3.5, 4.0, 4.5]
    assert batches(logged, "patient") == [2, 2, 4, 4, 4, 4]
    assert waited >= 0.3  # two calls: the interval ran out
    assert full < waited  # four calls: a full batch goes at once


async def test_a_bad_call_in_a_group_fails_alone(stub: Any) -> None:
    # four calls of one group (batches wait 300 ms to fill): the one whose content does not
    # match its shape goes alone and fails, the other three share a batch
    bad = request("patient", {"x": [9.0]})
    bad.inputs["x"].tensor_content += b"\x00\x00\x80\x3f"  # 2 floats for shape [1]
    calls = [stub.Predict(request("patient", {"x": [float(i)]}), timeout=10) for i in range(3)]
    with structlog.testing.capture_logs() as logged:
        *good, error = await asyncio.gather(
            *calls, stub.Predict(bad, timeout=10), return_exceptions=True
        )
    assert [values(r.outputs["y"]).tolist() for r in good] == [[3.0], [3.5], [4.0]]
    assert isinstance(error, grpc.aio.AioRpcError)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert sorted(batches(logged, "patient")) == [1, 3, 3, 3]


async def test_a_model_that_refuses_batches_is_served_one_by_one(stub: Any) -> None:
    with structlog.testing.capture_logs() as logged:
        first = await asyncio.gather(
            *(stub.Predict(request("single", {"x": [float(i)]}), timeout=10) for i in range(3))
        )
        again = await asyncio.gather(
            *(stub.Predict(request("single", {"x": [float(i)]}), timeout=10) for i in range(3))
        )
    for replies in (first, again):
        assert [values(r.outputs["y"]).tolist() for r in replies] == [[0.0], [2.0], [4.0]]
    off = [e for e in logged if e["event"] == "batching_off"]
    assert len(off) == 1 and off[0]["model"] == "single" and "refuses" in off[0]["reason"], off
    assert set(batches(logged, "single")) == {1}


async def test_a_caller_that_goes_away_leaves_its_batch(stub: Any, gateway: Gateway) -> None:
    with structlog.testing.capture_logs() as logged:
        calls = [stub.Predict(request("patient", {"x": [float(i)]}), timeout=10) for i in range(3)]
        # all three wait for the batch interval; the second caller gives up meanwhile
        await wait_for(
            lambda: gateway.admission.inflight == 3, timeout=5, what="three calls queued"
        )
        calls[1].cancel()
        first, last = await asyncio.gather(calls[0], calls[2])
        with pytest.raises(asyncio.CancelledError):
            await calls[1]
    assert values(first.outputs["y"]).tolist() == [3.0]
    assert values(last.outputs["y"]).tolist() == [4.0]
    lines = [e for e in logged if e["event"] == "request" and e["model"] == "patient"]
    assert sorted((e["status"], e["batch"]) for e in lines) == [
        ("CANCELLED", 1),
        ("OK", 2),
        ("OK", 2),
    ]
    await wait_for(lambda: gateway.admission.inflight == 0, timeout=5, what="nothing in flight")


async def test_queued_calls_count_against_max_inflight(
    tmp_path: Path, example_models: Path, own_backend: Proc, gateway: Gateway
) -> None:
    # a route-only gateway (the module's gateway configures the backend) allowing 2 calls
    cfg = write_config(
        tmp_path / "limited.yaml",
        models=example_models,
        backends=[{"name": "cpu-0", "address": own_backend.address, "accelerator": "cpu"}],
        gateway={"max_inflight": 2, "manage_backends": False},
        apis=apis(example_models),
    )
    limited = await start_gateway(cfg)
    try:
        async with grpc.aio.insecure_channel(limited.address) as channel:
            other = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            results = await asyncio.gather(
                *(other.Predict(request("patient", {"x": [1.0]}), timeout=10) for _ in range(3)),
                return_exceptions=True,
            )
    finally:
        await limited.stop()
    errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(errors) == 1 and errors[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "gateway.max_inflight" in (errors[0].details() or "")
    answers = [r for r in results if not isinstance(r, BaseException)]
    assert [values(r.outputs["y"]).tolist() for r in answers] == [[3.5], [3.5]]


async def test_bad_calls_fail_alone(stub: Any, gateway: Gateway) -> None:
    good = [stub.Predict(request("half_plus_two", {"x": [float(i)]}), timeout=30) for i in range(8)]
    # the same wrong input name twice, where batches wait to fill: one batch, which the backend
    # refuses; then each call on its own
    wrong = [stub.Predict(request("patient", {"z": [1.0]}), timeout=30) for _ in range(2)]
    ints = request("half_plus_two", {})
    ints.inputs["x"].CopyFrom(tensor_pb2.TensorProto(dtype=3, int_val=[1]))  # DT_INT32
    ints.inputs["x"].tensor_shape.dim.add(size=1)
    results = await asyncio.gather(
        *good, *wrong, stub.Predict(ints, timeout=30), return_exceptions=True
    )
    for i, reply in enumerate(results[:8]):
        assert not isinstance(reply, BaseException), reply
        assert values(reply.outputs["y"]).tolist() == [i * 0.5 + 3.0]
    for error in results[8:]:
        assert isinstance(error, grpc.aio.AioRpcError)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "z" in results[8].details() and "z" in results[9].details()
    # bytes that are no PredictRequest, for a batching model
    bad = request("half_plus_two", {"x": [1.0]}).SerializeToString() + b"\xff\xff"
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        raw = channel.unary_unary("/tensorflow.serving.PredictionService/Predict")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await raw(bad, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "PredictRequest" in (caught.value.details() or "")
