"""Tracing end to end: a gateway in this process (its spans in the SDK's in-memory exporter) with
a real embedded backend and real handler workers, which export their own spans over OTLP/HTTP to
a collector on loopback. Traces are put together from both sides by their ids: nothing here
parents a span by hand."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import MODELMUX, Proc, start_daemon
from gateway_helpers import start_gateway, wait_for, wait_serving, write_config
from google.protobuf import json_format
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import SpanKind, StatusCode
from test_gateway import X, tf_predict
from test_handlers import invoke_request
from tracing_helpers import Collector, Seen, chain, collector, from_sdk

from gateway.server import Gateway
from modelmux.v1 import async_pb2, async_pb2_grpc, inference_pb2_grpc, jobs_pb2, jobs_pb2_grpc
from modelmux_common import tracing
from modelmux_common.tfserving import predict_pb2

HANDLERS = Path(__file__).parent / "handlers"
FLOWER = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = (("traceparent", f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"),)
PREDICT = "tensorflow.serving.PredictionService/Predict"
WORKER = "modelmux-handler"  # the handler workers' service.name
BATCH_WORKER = "modelmux-batch-worker"
SERVER, CLIENT, INTERNAL, CONSUMER = (
    SpanKind.SERVER,
    SpanKind.CLIENT,
    SpanKind.INTERNAL,
    SpanKind.CONSUMER,
)


def half_plus_two_api(models: Path) -> dict[str, Any]:
    path = str(models / "half_plus_two")
    return {
        "name": "half-plus-two",
        "handler": {
            "type": "tensorflow",
            "models": {"paths": [{"name": "half_plus_two", "path": path}]},
        },
    }


@pytest.fixture(scope="module")
def otlp() -> Iterator[Collector]:
    yield from collector()


@pytest.fixture(scope="module")
def memory() -> Iterator[InMemorySpanExporter]:
    """This process traced into memory: the gateway built after it traces its calls."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(ALWAYS_ON))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    yield exporter
    tracing.shutdown()


@pytest.fixture(scope="module")
async def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    example_models: Path,
    backend: Proc,
    memory: InMemorySpanExporter,
    otlp: Collector,
) -> AsyncIterator[Gateway]:
    root = tmp_path_factory.mktemp("tracing")
    tf = {"type": "tensorflow"}
    apis: list[dict[str, Any]] = [
        {
            "name": "half-plus-two",
            "handler": {
                **tf,
                "models": {
                    "paths": [
                        {"name": "half_plus_two", "path": str(example_models / "half_plus_two")}
                    ]
                },
            },
        },
        {
            "name": "iris",
            "handler": {
                **tf,
                "path": str(HANDLERS / "iris_predictor.py"),
                "models": {"path": str(example_models / "iris")},
            },
        },
        {"name": "faulty", "handler": {"type": "python", "path": str(HANDLERS / "faulty.py")}},
        {
            "name": "iris-async",
            "kind": "AsyncAPI",
            "handler": {
                **tf,
                "path": str(HANDLERS / "async_seed.py"),
                "config": {"labels": ["setosa", "versicolor", "virginica"]},
                "models": {"path": str(example_models / "iris")},
            },
        },
        {
            "name": "iris-batch",
            "kind": "BatchAPI",
            "handler": {
                **tf,
                "path": str(HANDLERS / "batch_seed.py"),
                "config": {
                    "labels": ["setosa", "versicolor", "virginica"],
                    "results": str(root / "results"),
                },
                "models": {"path": str(example_models / "iris")},
            },
        },
    ]
    config = write_config(
        root / "modelmux.yaml",
        models=example_models,
        backends=[{"name": "cpu-0", "address": backend.address}],
        # the workers turn tracing on from the config; the OTLP exporter is the default
        gateway={"tracing": True, "state_dir": str(root / "state"), "shutdown_grace": "2s"},
        apis=apis,
    )
    with pytest.MonkeyPatch.context() as env:  # what the handler workers start with
        for name in ("OTEL_TRACES_EXPORTER", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"):
            env.delenv(name, raising=False)
        env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.endpoint)
        env.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        gw = await start_gateway(config)
    yield gw
    await gw.stop()


@pytest.fixture
async def channel(gateway: Gateway) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(gateway.address) as ch:
        yield ch


def gateway_spans(memory: InMemorySpanExporter) -> list[Seen]:
    return [from_sdk(s) for s in memory.get_finished_spans()]


def shape(spans: list[Seen]) -> list[tuple[str, SpanKind, str]]:
    return [(s.where, s.kind, s.name) for s in spans]


async def worker_spans(otlp: Collector, trace_id: str, name: str) -> list[Seen]:
    """The workers' spans of ``trace_id`` once one named ``name`` arrived."""

    def arrived() -> list[Seen]:
        mine = [s for s in otlp.spans if s.trace_id == trace_id]
        return mine if any(s.name == name for s in mine) else []

    return list(await wait_for(arrived, timeout=20, what=f"the worker's {name} span"))


def backend_predict(spans: list[Seen], trace_id: str) -> Seen:
    """The one backend Predict span of the trace."""
    [span] = [
        s
        for s in spans
        if s.trace_id == trace_id and s.kind == CLIENT and s.name == PREDICT and s.where != WORKER
    ]
    return span


async def test_invoke_is_one_trace_from_the_caller_to_the_backend(
    channel: grpc.aio.Channel, memory: InMemorySpanExporter, otlp: Collector
) -> None:
    stub = inference_pb2_grpc.InferenceStub(channel)
    reply = await stub.Invoke(invoke_request("iris", FLOWER), metadata=TRACEPARENT, timeout=30)
    assert reply.json.string_value == "setosa"

    workers = await worker_spans(otlp, CALLER_TRACE, "tensorflow_client.predict")
    spans = gateway_spans(memory) + workers
    path = chain(spans, backend_predict(spans, CALLER_TRACE))
    assert shape(path) == [
        ("gateway", SERVER, "modelmux.v1.Inference/Invoke"),
        ("gateway", CLIENT, "modelmux.v1.Inference/Invoke"),  # the call to the handler worker
        (WORKER, SERVER, "modelmux.v1.Inference/Invoke"),
        (WORKER, INTERNAL, "tensorflow_client.predict"),
        ("gateway", SERVER, PREDICT),  # the handler's call, back through the gateway
        ("gateway", CLIENT, PREDICT),  # the backend call
    ]
    assert {s.trace_id for s in path} == {CALLER_TRACE}
    assert path[0].parent_id == CALLER_SPAN  # the caller's span is the parent
    invoke = path[0].attributes
    assert invoke == {
        "rpc.system": "grpc",
        "rpc.service": "modelmux.v1.Inference",
        "rpc.method": "Invoke",
        "rpc.grpc.status_code": 0,
    }
    assert path[1].attributes["modelmux.api"] == "iris"
    assert path[2].attributes["rpc.grpc.status_code"] == 0
    assert path[5].attributes["modelmux.backend"] == "cpu-0"
    assert path[5].attributes["modelmux.model"] == "iris"
    # the signature fetch before the first Predict belongs to the same predict span
    metadata = [s for s in spans if s.name.endswith("/GetModelMetadata") and s.kind == SERVER]
    assert all(s.parent_id == path[3].span_id for s in metadata if s.trace_id == CALLER_TRACE)


async def test_a_call_without_traceparent_starts_a_trace_the_handler_continues(
    channel: grpc.aio.Channel, memory: InMemorySpanExporter, otlp: Collector
) -> None:
    memory.clear()
    await inference_pb2_grpc.InferenceStub(channel).Invoke(
        invoke_request("iris", FLOWER), timeout=30
    )
    [invoke] = [s for s in gateway_spans(memory) if s.name.endswith("/Invoke") and s.kind == SERVER]
    assert invoke.parent_id == "" and invoke.trace_id != CALLER_TRACE
    workers = await worker_spans(otlp, invoke.trace_id, "tensorflow_client.predict")
    spans = gateway_spans(memory) + workers
    assert chain(spans, backend_predict(spans, invoke.trace_id))[0] == invoke


async def test_a_handler_that_raises_is_an_error_on_every_span_of_the_call(
    channel: grpc.aio.Channel, memory: InMemorySpanExporter, otlp: Collector
) -> None:
    memory.clear()
    request = invoke_request("faulty", mode="raise")
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await inference_pb2_grpc.InferenceStub(channel).Invoke(request, timeout=30)
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    served, handler_call = sorted(gateway_spans(memory), key=lambda s: s.kind != SERVER)
    [ran] = await worker_spans(otlp, served.trace_id, "modelmux.v1.Inference/Invoke")
    assert shape(chain([served, handler_call, ran], ran)) == [
        ("gateway", SERVER, "modelmux.v1.Inference/Invoke"),
        ("gateway", CLIENT, "modelmux.v1.Inference/Invoke"),
        (WORKER, SERVER, "modelmux.v1.Inference/Invoke"),
    ]
    for span in (served, handler_call, ran):
        assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INTERNAL.value[0]
    assert handler_call.attributes["modelmux.api"] == "faulty"
    [error] = [s for s in memory.get_finished_spans() if s.kind == SERVER]
    assert error.status.status_code == StatusCode.ERROR


async def test_predict_to_the_backend_and_statuses(
    channel: grpc.aio.Channel, memory: InMemorySpanExporter, backend: Proc
) -> None:
    memory.clear()
    predict = channel.unary_unary(
        f"/{PREDICT}",
        request_serializer=predict_pb2.PredictRequest.SerializeToString,
        response_deserializer=predict_pb2.PredictResponse.FromString,
    )
    await predict(tf_predict("half_plus_two", X), metadata=TRACEPARENT, timeout=10)
    server, client = sorted(gateway_spans(memory), key=lambda s: s.kind != SERVER)
    assert shape([server, client]) == [("gateway", SERVER, PREDICT), ("gateway", CLIENT, PREDICT)]
    assert (server.trace_id, server.parent_id) == (CALLER_TRACE, CALLER_SPAN)
    assert (client.trace_id, client.parent_id) == (CALLER_TRACE, server.span_id)
    assert client.attributes == {
        "rpc.system": "grpc",
        "rpc.service": "tensorflow.serving.PredictionService",
        "rpc.method": "Predict",
        "rpc.grpc.status_code": 0,
        "server.address": backend.address,
        "modelmux.backend": "cpu-0",
        "modelmux.model": "half_plus_two",
        "modelmux.version": 2,
    }

    memory.clear()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await predict(tf_predict("no-such-model", X), timeout=10)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    [only] = memory.get_finished_spans()  # routing refused it: no backend call
    assert only.attributes is not None and only.attributes["rpc.grpc.status_code"] == 5
    assert only.status.is_ok  # a caller's mistake is not the server's error


async def test_an_async_run_links_to_its_submit(
    channel: grpc.aio.Channel, memory: InMemorySpanExporter, otlp: Collector
) -> None:
    memory.clear()
    request = async_pb2.SubmitRequest(api="iris-async")
    json_format.ParseDict(FLOWER, request.json)
    stub = async_pb2_grpc.AsyncStub(channel)
    submitted = await stub.Submit(request, metadata=TRACEPARENT, timeout=10)

    def ran() -> list[Seen]:
        return [
            s
            for s in gateway_spans(memory)
            if s.kind == CONSUMER and s.attributes.get("modelmux.request_id") == submitted.id
        ]

    [run] = await wait_for(ran, timeout=30, what="the async run's span")
    [submit] = [s for s in gateway_spans(memory) if s.name == "modelmux.v1.Async/Submit"]
    assert (submit.trace_id, submit.parent_id) == (CALLER_TRACE, CALLER_SPAN)
    # a trace of its own, linked to the Submit call's span
    assert run.trace_id != CALLER_TRACE and run.parent_id == ""
    assert run.links == ((CALLER_TRACE, submit.span_id),)
    assert run.attributes["rpc.grpc.status_code"] == 0

    workers = await worker_spans(otlp, run.trace_id, "tensorflow_client.predict")
    spans = gateway_spans(memory) + workers
    assert shape(chain(spans, backend_predict(spans, run.trace_id))) == [
        ("gateway", CONSUMER, "modelmux.handler.Worker/HandleAsync"),
        (WORKER, SERVER, "modelmux.handler.Worker/HandleAsync"),
        (WORKER, INTERNAL, "tensorflow_client.predict"),
        ("gateway", SERVER, PREDICT),
        ("gateway", CLIENT, PREDICT),
    ]


async def test_each_batch_of_a_job_is_a_trace_linked_to_its_submit(
    channel: grpc.aio.Channel,
    memory: InMemorySpanExporter,
    otlp: Collector,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"):
        monkeypatch.delenv(name, raising=False)  # what the job's worker starts with
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    memory.clear()
    stub = jobs_pb2_grpc.JobsStub(channel)
    request = json_format.ParseDict(
        {
            "api": "iris-batch",
            "workers": 1,
            "itemList": {"items": [FLOWER, FLOWER], "batchSize": 1},
        },
        jobs_pb2.SubmitJobRequest(),
    )
    job_id = (await stub.SubmitJob(request, metadata=TRACEPARENT, timeout=30)).job.job_id
    updates = [u async for u in stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id), timeout=120)]
    assert jobs_pb2.JobStatus.Name(updates[-1].job.status).endswith("SUCCEEDED"), updates[-1]
    [submit] = [s for s in gateway_spans(memory) if s.name == "modelmux.v1.Jobs/SubmitJob"]
    assert (submit.trace_id, submit.parent_id) == (CALLER_TRACE, CALLER_SPAN)

    def ran() -> list[Seen]:
        mine = [s for s in otlp.spans if s.attributes.get("modelmux.job_id") == job_id]
        return mine if len(mine) == 3 else []

    runs = sorted(await wait_for(ran, timeout=30, what="the job's spans"), key=lambda s: s.name)
    assert [(s.where, s.kind, s.name) for s in runs] == [
        (BATCH_WORKER, CONSUMER, "handle_batch"),
        (BATCH_WORKER, CONSUMER, "handle_batch"),
        (BATCH_WORKER, CONSUMER, "on_job_complete"),
    ]
    # each a trace of its own (no parent), linked to the SubmitJob call's span
    assert len({s.trace_id for s in runs}) == 3 and CALLER_TRACE not in {s.trace_id for s in runs}
    assert all(s.parent_id == "" and s.links == ((CALLER_TRACE, submit.span_id),) for s in runs)
    assert all(s.attributes["rpc.grpc.status_code"] == 0 for s in runs)
    assert len({s.attributes["modelmux.batch_id"] for s in runs[:2]}) == 2
    for run in runs[:2]:  # the handler's predict, through the gateway to the backend
        predict = await worker_spans(otlp, run.trace_id, "tensorflow_client.predict")
        spans = gateway_spans(memory) + predict
        assert shape(chain(spans, backend_predict(spans, run.trace_id))) == [
            (BATCH_WORKER, CONSUMER, "handle_batch"),
            (BATCH_WORKER, INTERNAL, "tensorflow_client.predict"),
            ("gateway", SERVER, PREDICT),
            ("gateway", CLIENT, PREDICT),
        ]


def _process_config(root: Path, example_models: Path, backend: Proc) -> Path:
    """A gateway that only routes (the module's gateway manages the backend) and says nothing of
    tracing: the environment turns it on."""
    return write_config(
        root / "process.yaml",
        models=example_models,
        backends=[{"name": "cpu-0", "address": backend.address}],
        gateway={"manage_backends": False, "status_interval": "200ms"},
        apis=[half_plus_two_api(example_models)],
    )


async def test_a_gateway_process_traced_by_otel_variables_flushes_at_sigterm(
    tmp_path: Path, example_models: Path, backend: Proc, gateway: Gateway, otlp: Collector
) -> None:
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
        "OTEL_SERVICE_NAME": "gateway-under-test",
        "OTEL_BSP_SCHEDULE_DELAY": "600000",  # nothing leaves before the stop
    }
    config = _process_config(tmp_path, example_models, backend)
    proc = await asyncio.to_thread(start_daemon, ["gateway", "--config", str(config)], env=env)
    try:
        await asyncio.to_thread(wait_serving, proc.address)
        trace_id = "5" * 32
        with grpc.insecure_channel(proc.address) as ch:
            predict = ch.unary_unary(
                f"/{PREDICT}",
                request_serializer=predict_pb2.PredictRequest.SerializeToString,
                response_deserializer=predict_pb2.PredictResponse.FromString,
            )
            metadata = (("traceparent", f"00-{trace_id}-{CALLER_SPAN}-01"),)
            await asyncio.to_thread(predict, tf_predict("half_plus_two", X), metadata=metadata)
        assert not [s for s in otlp.spans if s.trace_id == trace_id]
    finally:
        assert await asyncio.to_thread(proc.stop) == 0
    mine = [s for s in otlp.spans if s.trace_id == trace_id]
    assert shape(sorted(mine, key=lambda s: s.kind != SERVER)) == [
        ("gateway-under-test", SERVER, PREDICT),
        ("gateway-under-test", CLIENT, PREDICT),
    ]


def test_an_otlp_protocol_this_build_lacks_stops_the_gateway_at_start(
    tmp_path: Path, example_models: Path, backend: Proc
) -> None:
    config = _process_config(tmp_path, example_models, backend)
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    done = subprocess.run(
        [*MODELMUX, "gateway", "--config", str(config)],
        env={**env, "MODELMUX_LOG_FORMAT": "json"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert (
        "OTEL_EXPORTER_OTLP_PROTOCOL='grpc': this build exports http/protobuf only" in done.stderr
    )
