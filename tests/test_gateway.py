"""The gateway end to end: real embedded backend (subprocess), real grpc.aio gateway, real grpcurl."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import structlog.testing
from conftest import ROOT, Proc
from gateway_helpers import health_status, start_gateway, write_config
from grpc_health.v1 import health_pb2

from gateway.server import Gateway
from modelmux.v1 import inference_pb2, inference_pb2_grpc, models_pb2, models_pb2_grpc, tensor_pb2
from modelmux_common.tfserving import get_model_metadata_pb2, get_model_status_pb2, predict_pb2

# The official TF Serving stubs (TensorFlow's own message classes, without the TensorFlow runtime).
from backend.tfserving import model_service_pb2_grpc, prediction_service_pb2_grpc  # isort: skip

GRPCURL = shutil.which("grpcurl") or str(Path(ROOT, ".venv", "bin", "grpcurl"))
X = [1.0, 2.0, 5.0]
IRIS = {
    "setosa": [5.1, 3.5, 1.4, 0.2],
    "versicolor": [5.9, 3.0, 4.2, 1.5],
    "virginica": [6.9, 3.1, 5.4, 2.1],
}
IRIS_INPUTS = ("sepal_length", "sepal_width", "petal_length", "petal_width")


@pytest.fixture(scope="module")
async def gateway(
    tmp_path_factory: pytest.TempPathFactory, example_models: Path, backend: Proc
) -> AsyncIterator[Gateway]:
    cfg = write_config(
        tmp_path_factory.mktemp("gw") / "modelmux.yaml",
        models=example_models,
        backends=[{"name": "cpu-0", "address": backend.address, "accelerator": "cpu"}],
        gateway={"max_message_bytes": 4 * 1024 * 1024},
    )
    gw = await start_gateway(cfg)
    yield gw
    await gw.stop()


@pytest.fixture
async def channel(gateway: Gateway) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(gateway.address) as ch:
        yield ch


async def grpcurl(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Runs the real grpcurl binary off the event loop (the gateway under test shares the loop)."""
    return await asyncio.to_thread(
        subprocess.run,
        [GRPCURL, "-plaintext", "-max-time", "10", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tf_predict(model: str, x: list[float], *, version: int | None = None, label: str = "") -> Any:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    if version is not None:
        request.model_spec.version.value = version
    if label:
        request.model_spec.version_label = label
    tensor = request.inputs["x"]
    tensor.dtype = 1  # DT_FLOAT
    tensor.tensor_shape.dim.add().size = len(x)
    tensor.tensor_content = np.asarray(x, dtype="<f4").tobytes()
    return request


def y_of(response: Any) -> list[float]:
    t = response.outputs["y"]
    return (
        np.frombuffer(t.tensor_content, dtype="<f4").tolist()
        if t.tensor_content
        else list(t.float_val)
    )


# --- grpcurl and reflection -------------------------------------------------------------------


async def test_grpcurl_lists_every_service(gateway: Gateway) -> None:
    out = await grpcurl(gateway.address, "list")
    assert out.returncode == 0, out.stderr
    services = set(out.stdout.split())
    assert {
        "modelmux.v1.Inference",
        "modelmux.v1.Models",
        "tensorflow.serving.PredictionService",
        "tensorflow.serving.ModelService",
        "grpc.health.v1.Health",
    } <= services


async def test_grpcurl_describes_tf_serving_messages(gateway: Gateway) -> None:
    out = await grpcurl(gateway.address, "describe", "tensorflow.serving.PredictRequest")
    assert out.returncode == 0, out.stderr
    assert "model_spec" in out.stdout and "inputs" in out.stdout


@pytest.mark.parametrize(
    ("extra", "version", "expected"),
    [
        ({}, 2, [3.5, 4.0, 5.5]),
        ({"version": "1"}, 1, [2.5, 3.0, 4.5]),
        ({"version": "2"}, 2, [3.5, 4.0, 5.5]),
    ],
)
async def test_grpcurl_predict_json(
    gateway: Gateway, extra: dict[str, str], version: int, expected: list[float]
) -> None:
    body = json.dumps({"model": "half_plus_two", "json_inputs": {"x": X}, **extra})
    out = await grpcurl("-d", body, gateway.address, "modelmux.v1.Inference/Predict")
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert reply["json_outputs"]["y"] == expected
    assert reply["version"] == str(version)
    assert reply["model"] == "half_plus_two"


async def test_grpcurl_health_serving(gateway: Gateway) -> None:
    out = await grpcurl(gateway.address, "grpc.health.v1.Health/Check")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["status"] == "SERVING"
    model = await grpcurl(
        "-d", '{"service":"modelmux.v1.Model/iris"}', gateway.address, "grpc.health.v1.Health/Check"
    )
    assert json.loads(model.stdout)["status"] == "SERVING"


async def test_grpcurl_facade_get_model_status(gateway: Gateway) -> None:
    body = json.dumps({"model_spec": {"name": "half_plus_two"}})
    out = await grpcurl(
        "-d", body, gateway.address, "tensorflow.serving.ModelService/GetModelStatus"
    )
    assert out.returncode == 0, out.stderr
    states = {s["version"]: s["state"] for s in json.loads(out.stdout)["model_version_status"]}
    assert states == {"1": "AVAILABLE", "2": "AVAILABLE"}


# --- modelmux.v1 ------------------------------------------------------------------------------


def typed(values: list[float]) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(
        dtype=tensor_pb2.DATA_TYPE_FLOAT32,
        shape=[len(values)],
        content=np.asarray(values, dtype="<f4").tobytes(),
    )


async def test_typed_tensors_latest_version_and_label(channel: grpc.aio.Channel) -> None:
    stub = inference_pb2_grpc.InferenceStub(channel)
    cases = [({}, 2, [3.5, 4.0, 5.5]), ({"version": 1}, 1, [2.5, 3.0, 4.5])]
    cases += [
        ({"version_label": "stable"}, 1, [2.5, 3.0, 4.5]),
        ({"version_label": "canary"}, 2, [3.5, 4.0, 5.5]),
    ]
    for extra, version, expected in cases:
        reply = await stub.Predict(
            inference_pb2.PredictRequest(model="half_plus_two", inputs={"x": typed(X)}, **extra)
        )
        assert reply.version == version, extra
        y = reply.outputs["y"]
        assert y.dtype == tensor_pb2.DATA_TYPE_FLOAT32 and list(y.shape) == [3]
        assert np.frombuffer(y.content, dtype="<f4").tolist() == expected
        assert not reply.json_outputs.fields


async def test_json_iris_keeps_shapes_and_int64(channel: grpc.aio.Channel) -> None:
    stub = inference_pb2_grpc.InferenceStub(channel)
    request = inference_pb2.PredictRequest(model="iris")
    for i, name in enumerate(IRIS_INPUTS):
        request.json_inputs.update({name: [sample[i] for sample in IRIS.values()]})
    reply = await stub.Predict(request)
    outputs = json.loads(json.dumps(dict(reply.json_outputs)["class_ids"], default=list))
    assert outputs == [[0], [1], [2]]
    probabilities = dict(reply.json_outputs)["probabilities"]
    assert len(probabilities) == 3 and all(len(row) == 3 for row in probabilities)


async def test_json_scalar_for_vector_input(channel: grpc.aio.Channel) -> None:
    stub = inference_pb2_grpc.InferenceStub(channel)
    request = inference_pb2.PredictRequest(model="iris")
    request.json_inputs.update(dict(zip(IRIS_INPUTS, IRIS["virginica"], strict=True)))
    reply = await stub.Predict(request)
    assert list(dict(reply.json_outputs)["class_ids"][0]) == [2]


async def test_list_and_get_models(channel: grpc.aio.Channel, backend: Proc) -> None:
    stub = models_pb2_grpc.ModelsStub(channel)
    listing = await stub.ListModels(models_pb2.ListModelsRequest())
    by_name = {m.name: m for m in listing.models}
    assert set(by_name) == {"half_plus_two", "iris"}
    hpt = by_name["half_plus_two"]
    assert hpt.latest_version == 2 and dict(hpt.labels) == {"stable": 1, "canary": 2}
    assert [v.version for v in hpt.versions] == [1, 2] and all(v.routable for v in hpt.versions)
    placement = hpt.versions[0].backends[0]
    assert placement.address == backend.address
    assert placement.state == models_pb2.VERSION_STATE_AVAILABLE
    assert placement.accelerator == models_pb2.ACCELERATOR_CPU
    assert listing.limits.max_inflight == 1024 and listing.limits.backend_max_inflight == 256
    one = await stub.GetModel(models_pb2.GetModelRequest(name="iris"))
    assert one.model.api == "iris" and one.model.latest_version == 1


# --- the TF Serving facade gives what the backend itself gives --------------------------------


async def test_facade_matches_backend(channel: grpc.aio.Channel, backend: Proc) -> None:
    async with grpc.aio.insecure_channel(backend.address) as direct:
        via, own = (
            prediction_service_pb2_grpc.PredictionServiceStub(channel),
            prediction_service_pb2_grpc.PredictionServiceStub(direct),
        )
        for kwargs in ({}, {"version": 1}, {"version": 2}):
            request = tf_predict("half_plus_two", X, **kwargs)
            assert await via.Predict(request) == await own.Predict(request), kwargs
        # Labels are resolved by the gateway (the backends hold versions, not labels).
        for label, version in (("stable", 1), ("canary", 2)):
            labelled = await via.Predict(tf_predict("half_plus_two", X, label=label))
            assert labelled == await own.Predict(tf_predict("half_plus_two", X, version=version)), (
                label
            )
        meta = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        meta.model_spec.name = "iris"
        assert await via.GetModelMetadata(meta) == await own.GetModelMetadata(meta)
        status = get_model_status_pb2.GetModelStatusRequest()
        status.model_spec.name = "half_plus_two"
        assert await model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
            status
        ) == await model_service_pb2_grpc.ModelServiceStub(direct).GetModelStatus(status)


async def test_facade_numbers(channel: grpc.aio.Channel) -> None:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    latest = await stub.Predict(tf_predict("half_plus_two", X))
    assert y_of(latest) == [3.5, 4.0, 5.5] and latest.model_spec.version.value == 2
    assert y_of(await stub.Predict(tf_predict("half_plus_two", X, version=1))) == [2.5, 3.0, 4.5]


# --- bad input: precise status, gateway keeps serving -----------------------------------------


async def expect_error(call: Any, code: grpc.StatusCode, *needles: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    details = info.value.details() or ""
    for needle in needles:
        assert needle in details, details
    return details


async def still_serving(channel: grpc.aio.Channel) -> None:
    stub = inference_pb2_grpc.InferenceStub(channel)
    reply = await stub.Predict(
        inference_pb2.PredictRequest(model="half_plus_two", inputs={"x": typed(X)})
    )
    assert reply.version == 2


async def test_unknown_model_version_label(channel: grpc.aio.Channel) -> None:
    own = inference_pb2_grpc.InferenceStub(channel)
    tf = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    nf = grpc.StatusCode.NOT_FOUND
    await expect_error(
        own.Predict(inference_pb2.PredictRequest(model="nope", inputs={"x": typed(X)})),
        nf,
        "'nope'",
    )
    await expect_error(tf.Predict(tf_predict("nope", X)), nf, "'nope'")
    await expect_error(
        own.Predict(
            inference_pb2.PredictRequest(model="half_plus_two", version=7, inputs={"x": typed(X)})
        ),
        nf,
        "version 7",
        "1, 2",
    )
    await expect_error(tf.Predict(tf_predict("half_plus_two", X, version=7)), nf, "version 7")
    await expect_error(
        tf.Predict(tf_predict("half_plus_two", X, label="beta")), nf, "'beta'", "canary, stable"
    )
    await expect_error(
        models_pb2_grpc.ModelsStub(channel).GetModel(models_pb2.GetModelRequest(name="nope")),
        nf,
        "'nope'",
    )
    await still_serving(channel)


async def test_wrong_input_name_dtype_shape(channel: grpc.aio.Channel) -> None:
    own = inference_pb2_grpc.InferenceStub(channel)
    bad = grpc.StatusCode.INVALID_ARGUMENT
    wrong_name = inference_pb2.PredictRequest(model="half_plus_two", inputs={"z": typed(X)})
    await expect_error(own.Predict(wrong_name), bad, "'z'")
    json_name = inference_pb2.PredictRequest(model="half_plus_two")
    json_name.json_inputs.update({"z": X})
    await expect_error(own.Predict(json_name), bad, "'z'", "x")
    ints = tensor_pb2.Tensor(
        dtype=tensor_pb2.DATA_TYPE_INT32, shape=[3], content=np.arange(3, dtype="<i4").tobytes()
    )
    await expect_error(
        own.Predict(inference_pb2.PredictRequest(model="half_plus_two", inputs={"x": ints})),
        bad,
        "'x'",
    )
    square = tensor_pb2.Tensor(
        dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[2, 2], content=np.zeros(4, dtype="<f4").tobytes()
    )
    await expect_error(
        own.Predict(inference_pb2.PredictRequest(model="half_plus_two", inputs={"x": square})),
        bad,
        "'x'",
    )
    short = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[3], content=b"\0" * 5)
    await expect_error(
        own.Predict(inference_pb2.PredictRequest(model="half_plus_two", inputs={"x": short})),
        bad,
        "12 content bytes",
        "5",
    )
    text = inference_pb2.PredictRequest(model="half_plus_two")
    text.json_inputs.update({"x": ["a", "b"]})
    await expect_error(own.Predict(text), bad, "'x'", "strings")
    ragged = inference_pb2.PredictRequest(model="half_plus_two")
    ragged.json_inputs.update({"x": [[1.0], [1.0, 2.0]]})
    await expect_error(own.Predict(ragged), bad, "'x'", "ragged")
    tf = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = tf_predict("half_plus_two", X)
    request.inputs["x"].dtype = 3  # DT_INT32 with float bytes
    await expect_error(tf.Predict(request), bad, "x")
    await still_serving(channel)


async def test_undecodable_bytes(channel: grpc.aio.Channel) -> None:
    garbage = b"\x0a\xff\xff\xff\xff\x0f\x01"
    bad = grpc.StatusCode.INVALID_ARGUMENT
    for method, needle in (
        ("/modelmux.v1.Inference/Predict", "modelmux.v1.PredictRequest"),
        ("/tensorflow.serving.PredictionService/Predict", "tensorflow.serving.PredictRequest"),
        ("/tensorflow.serving.ModelService/GetModelStatus", "GetModelStatusRequest"),
        ("/modelmux.v1.Models/GetModel", "GetModelRequest"),
    ):
        raw = channel.unary_unary(method)
        await expect_error(raw(garbage), bad, needle)
    await still_serving(channel)


async def test_message_over_limit(channel: grpc.aio.Channel) -> None:
    big = np.zeros(2 * 1024 * 1024, dtype="<f4")  # 8 MB > the 4 MB limit of this gateway
    request = inference_pb2.PredictRequest(
        model="half_plus_two",
        inputs={
            "x": tensor_pb2.Tensor(
                dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[big.size], content=big.tobytes()
            )
        },
    )
    await expect_error(
        inference_pb2_grpc.InferenceStub(channel).Predict(request),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    await still_serving(channel)


async def test_reload_config_is_refused(channel: grpc.aio.Channel) -> None:
    from modelmux_common.tfserving import model_management_pb2

    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    await expect_error(
        stub.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest()),
        grpc.StatusCode.UNIMPLEMENTED,
        "modelmux config",
    )


async def test_health_per_model(gateway: Gateway) -> None:
    assert (
        await health_status(gateway.address, "modelmux.v1.Model/half_plus_two")
        == health_pb2.HealthCheckResponse.SERVING
    )
    assert await health_status(gateway.address, "modelmux.v1.Model/nope") == -1


async def test_one_summary_line_per_request_with_the_callers_request_id(
    channel: grpc.aio.Channel,
) -> None:
    stub = inference_pb2_grpc.InferenceStub(channel)
    with structlog.testing.capture_logs() as logged:
        await stub.Predict(
            inference_pb2.PredictRequest(model="half_plus_two", version=1, inputs={"x": typed(X)}),
            metadata=(("x-request-id", "req-42"),),
        )
        await expect_error(
            stub.Predict(inference_pb2.PredictRequest(model="nope", inputs={"x": typed(X)})),
            grpc.StatusCode.NOT_FOUND,
        )
    lines = [entry for entry in logged if entry["event"] == "request"]
    assert len(lines) == 2
    ok, missing = lines
    assert ok["request_id"] == "req-42" and ok["model"] == "half_plus_two" and ok["version"] == 1
    assert ok["backend"] == "cpu-0" and ok["status"] == "OK" and ok["ms"] > 0
    assert missing["status"] == "NOT_FOUND" and missing["request_id"] and missing["model"] == "nope"
