"""Bearer tokens per API (gateway.auth) on a real gateway: UNAUTHENTICATED without a token or with
a malformed one, PERMISSION_DENIED with a wrong one (another API's too), a handler's own Predict
through the gateway needing none, and no token ever in a log line or a status; long user input
cut in statuses and log lines."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog.testing
from conftest import Proc
from gateway_helpers import start_gateway, write_config
from google.protobuf import json_format
from test_gateway import IRIS, IRIS_INPUTS, X

from gateway.server import Gateway
from modelmux.v1 import async_pb2, inference_pb2, jobs_pb2, jobs_pb2_grpc, models_pb2
from modelmux_common.tfserving import get_model_status_pb2, predict_pb2

HANDLERS = Path(__file__).parent / "handlers"
PREDICT_TOKENS = ("predict-old-Zq1", "predict-new-Xw2~")
INVOKE_TOKEN = "invoke-9f8e7d6c5b4a"
ASYNC_TOKEN = "async-0a1b2c3d"
JOBS_TOKEN = "jobs-7e6d5c"
ENV = "MODELMUX_TEST_INVOKE_TOKEN"
Code = grpc.StatusCode


@pytest.fixture(scope="module")
async def gateway(
    tmp_path_factory: pytest.TempPathFactory, example_models: Path, backend: Proc
) -> AsyncIterator[Gateway]:
    folder = tmp_path_factory.mktemp("auth")
    (folder / "predict.tokens").write_text("\n".join(PREDICT_TOKENS) + "\n")
    (folder / "async.tokens").write_text(ASYNC_TOKEN)
    (folder / "jobs.tokens").write_text(JOBS_TOKEN)
    os.environ[ENV] = INVOKE_TOKEN
    half = {"paths": [{"name": "half_plus_two", "path": str(example_models / "half_plus_two")}]}
    cfg = write_config(
        folder / "modelmux.yaml",
        models=example_models,
        backends=[{"name": "cpu-0", "address": backend.address}],
        gateway={
            "auth": {
                "predict": {"file": "predict.tokens"},
                "invoke": {"env": ENV},
                "async": {"file": "async.tokens"},
                "jobs": {"file": "jobs.tokens"},
            },
            "state_dir": str(folder / "state"),
        },
        apis=[
            {"name": "half-plus-two", "handler": {"type": "tensorflow", "models": half}},
            {
                "name": "iris",
                "handler": {
                    "type": "tensorflow",
                    "path": str(HANDLERS / "iris_predictor.py"),
                    "models": {"path": str(example_models / "iris")},
                },
            },
            {
                "name": "iris-batch",
                "kind": "BatchAPI",
                "handler": {
                    "type": "tensorflow",
                    "path": str(HANDLERS / "batch_seed.py"),
                    "config": {
                        "labels": ["setosa", "versicolor", "virginica"],
                        "results": str(folder / "results"),
                    },
                    "models": {"path": str(example_models / "iris")},
                },
            },
        ],
    )
    try:
        gw = await start_gateway(cfg)
    finally:
        del os.environ[ENV]  # read at start: the gateway needs it no longer
    yield gw
    await gw.stop()


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def call(
    gw: Gateway, method: str, request: Any, metadata: tuple[tuple[str, str], ...] = ()
) -> tuple[Code, str]:
    """The status of one call (OK and "" when it succeeds)."""
    async with grpc.aio.insecure_channel(gw.address) as channel:
        try:
            await channel.unary_unary(method)(
                request.SerializeToString(), timeout=30, metadata=metadata
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
    return Code.OK, ""


def modelmux_predict(model: str = "half_plus_two") -> inference_pb2.PredictRequest:
    request = inference_pb2.PredictRequest(model=model)
    request.json_inputs.update({"x": X})
    return request


def tf_predict() -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "half_plus_two"
    request.inputs["x"].dtype = 1  # DT_FLOAT
    request.inputs["x"].tensor_shape.dim.add().size = 1
    request.inputs["x"].float_val.append(1.0)
    return request


def tf_status() -> get_model_status_pb2.GetModelStatusRequest:
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "half_plus_two"
    return request


def iris_invoke() -> inference_pb2.InvokeRequest:
    request = inference_pb2.InvokeRequest(api="iris")
    json_format.ParseDict(dict(zip(IRIS_INPUTS, IRIS["setosa"], strict=True)), request.json)
    return request


PREDICT_CALLS = [
    ("/modelmux.v1.Inference/Predict", modelmux_predict),
    ("/tensorflow.serving.PredictionService/Predict", tf_predict),
    ("/tensorflow.serving.ModelService/GetModelStatus", tf_status),
]


@pytest.mark.parametrize(("method", "request_of"), PREDICT_CALLS, ids=lambda p: str(p)[-20:])
async def test_the_predict_api_needs_one_of_its_tokens(
    gateway: Gateway, method: str, request_of: Any
) -> None:
    request = request_of()
    code, details = await call(gateway, method, request)
    assert code == Code.UNAUTHENTICATED and "authorization: Bearer <token>" in details
    for malformed in ("Basic cHJlZGljdA==", "Bearer", "Bearer two words", PREDICT_TOKENS[0]):
        code, _ = await call(gateway, method, request, (("authorization", malformed),))
        assert code == Code.UNAUTHENTICATED, malformed
    for wrong in ("predict-old-Zq", INVOKE_TOKEN):
        code, details = await call(gateway, method, request, bearer(wrong))
        assert code == Code.PERMISSION_DENIED, wrong
        assert wrong not in details
    for token in PREDICT_TOKENS:  # both lines of the file: a token can be rotated in
        assert await call(gateway, method, request, bearer(token)) == (Code.OK, "")


async def test_invoke_needs_its_token_and_the_handler_predicts_without_one(
    gateway: Gateway,
) -> None:
    """The iris handler calls Predict through the gateway (tensorflow_client): its worker's
    secret lets it through, though Predict needs a token the handler never had."""
    method = "/modelmux.v1.Inference/Invoke"
    assert (await call(gateway, method, iris_invoke()))[0] == Code.UNAUTHENTICATED
    assert (await call(gateway, method, iris_invoke(), bearer(PREDICT_TOKENS[0])))[
        0
    ] == Code.PERMISSION_DENIED
    assert await call(gateway, method, iris_invoke(), bearer(INVOKE_TOKEN)) == (Code.OK, "")


async def test_a_forged_handler_mark_is_no_token(gateway: Gateway) -> None:
    for value in ("1", "x" * 43):
        code, _ = await call(
            gateway,
            "/modelmux.v1.Inference/Predict",
            modelmux_predict(),
            (("x-modelmux-handler-call", value),),
        )
        assert code == Code.UNAUTHENTICATED


async def test_async_needs_its_token_and_models_stays_open(gateway: Gateway) -> None:
    method = "/modelmux.v1.Async/List"
    request = async_pb2.ListRequest(api="nowhere")
    assert (await call(gateway, method, request))[0] == Code.UNAUTHENTICATED
    assert (await call(gateway, method, request, bearer(INVOKE_TOKEN)))[0] == (
        Code.PERMISSION_DENIED
    )
    # past the check: the API's own answer
    assert (await call(gateway, method, request, bearer(ASYNC_TOKEN)))[0] == Code.NOT_FOUND
    listed = await call(gateway, "/modelmux.v1.Models/ListModels", models_pb2.ListModelsRequest())
    assert listed == (Code.OK, "")


async def test_jobs_need_their_token_and_a_batch_handler_predicts_without_one(
    gateway: Gateway,
) -> None:
    """The batch seed's handler calls Predict through the gateway from the job's worker
    process, which the gateway started with its handler secret."""
    method = "/modelmux.v1.Jobs/SubmitJob"
    flower = dict(zip(IRIS_INPUTS, IRIS["setosa"], strict=True))
    request = json_format.ParseDict(
        {"api": "iris-batch", "workers": 1, "itemList": {"items": [flower], "batchSize": 1}},
        jobs_pb2.SubmitJobRequest(),
    )
    assert (await call(gateway, method, request))[0] == Code.UNAUTHENTICATED
    assert (await call(gateway, method, request, bearer(ASYNC_TOKEN)))[0] == (
        Code.PERMISSION_DENIED
    )
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = jobs_pb2_grpc.JobsStub(channel)
        job = (await stub.SubmitJob(request, metadata=bearer(JOBS_TOKEN), timeout=30)).job
        watch = jobs_pb2.WatchJobRequest(job_id=job.job_id)
        updates = [u async for u in stub.WatchJob(watch, metadata=bearer(JOBS_TOKEN), timeout=120)]
    ended = updates[-1].job
    assert jobs_pb2.JobStatus.Name(ended.status) == "JOB_STATUS_SUCCEEDED", ended
    assert ended.batches_succeeded == 1


async def test_no_token_is_ever_logged_or_echoed(gateway: Gateway) -> None:
    everything = [*PREDICT_TOKENS, INVOKE_TOKEN, ASYNC_TOKEN, "wrong-token-Q7"]
    details = []
    with structlog.testing.capture_logs() as logs:
        for token in everything:
            for method, request_of in PREDICT_CALLS:
                details.append((await call(gateway, method, request_of(), bearer(token)))[1])
            invoke = "/modelmux.v1.Inference/Invoke"
            details.append((await call(gateway, invoke, iris_invoke(), bearer(token)))[1])
    assert any(e["event"] == "request" for e in logs)
    text = repr(logs) + repr(details)
    for token in everything:
        assert token not in text


async def test_long_user_input_is_cut_in_statuses_and_log_lines(gateway: Gateway) -> None:
    # a request id under gRPC's 8 KiB metadata soft limit (past it grpc refuses some calls at random)
    name, request_id = "m" * 10_000, "r" * 6_000
    metadata = (*bearer(PREDICT_TOKENS[1]), ("x-request-id", request_id))
    with structlog.testing.capture_logs() as logs:
        code, details = await call(
            gateway, "/modelmux.v1.Inference/Predict", modelmux_predict(name), metadata
        )
    assert code == Code.NOT_FOUND, details
    assert "(10000 characters)" in details and len(details) < 1000
    line = next(e for e in logs if e["event"] == "request")
    assert len(str(line["model"])) < 200 and "(10000 characters)" in str(line["model"])
    assert len(str(line["request_id"])) <= 128
    assert all(len(repr(e)) < 2000 for e in logs), [repr(e)[:200] for e in logs]
