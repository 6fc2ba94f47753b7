"""Tracing in one process: the edge's server span and the forwarder's backend span against an
in-memory backend (the traceparent the backend gets is the backend span's), statuses on spans,
links to stored traceparents, turning it on and off, and the async status record's new field."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased
from opentelemetry.trace import SpanKind, StatusCode

from gateway.asyncapi.records import Status
from gateway.edge import Call, Lifecycle, edge
from gateway.forwarding import Forwarder
from gateway.request import resolve
from gateway.routing import Target
from gateway.transport import MemoryTransport, rpc_error
from modelmux_common import tracing
from unit.unit_helpers import Context, endpoint, predict_reply, table

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01"
RPC = "tensorflow.serving.PredictionService/Predict"


def _install(sampler: Any) -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(sampler))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    return exporter


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    yield _install(ALWAYS_ON)
    tracing.shutdown()


def _hex(span: ReadableSpan) -> tuple[str, str, str]:
    """(trace id, span id, parent span id) in hex."""
    context = span.get_span_context()
    assert context is not None
    parent = "" if span.parent is None else f"{span.parent.span_id:016x}"
    return f"{context.trace_id:032x}", f"{context.span_id:016x}", parent


def _backends(*replies: Any) -> tuple[Any, list[MemoryTransport]]:
    """A table of one model version on one backend per reply (bytes, or an error raised)."""
    targets, transports = [], []
    for number, reply in enumerate(replies):

        async def answer(method: str, data: bytes, reply: Any = reply) -> bytes:
            if isinstance(reply, Exception):
                raise reply
            return bytes(reply)

        backend = endpoint(f"b{number}", answer)
        assert isinstance(backend.transport, MemoryTransport)
        transports.append(backend.transport)
        targets.append(Target(backend, "m", True))
    return table({1: tuple(targets)}), transports


async def _call(routes: Any, metadata: tuple[tuple[str, str], ...] = ()) -> Context:
    """One Predict through an edge built now (so with the tracing in force now)."""
    forwarder = Forwarder(timeout=5.0, backend_max_inflight=10)

    async def handle(data: bytes, ctx: Any, call: Call) -> bytes:
        request = resolve(routes, "Predict", data, model="m", version=None, label=None)
        return await forwarder.send(request, ctx, call)

    run = edge(RPC, handle, log_requests=False, lifecycle=Lifecycle())
    context = Context(metadata)
    try:
        await run(b"", context)  # type: ignore[arg-type]
    except grpc.RpcError:
        pass  # aborted: context.aborted says how
    return context


async def test_off_no_span_and_no_trace_context_to_the_backend() -> None:
    assert tracing.active() is None
    routes, [transport] = _backends(predict_reply())
    context = await _call(routes, (("traceparent", TRACEPARENT),))
    assert context.aborted is None
    assert transport.metadata == [()]  # nothing added, the caller's traceparent not passed on


async def test_the_backend_gets_the_backend_spans_traceparent(
    spans: InMemorySpanExporter,
) -> None:
    routes, [transport] = _backends(predict_reply())
    await _call(routes, (("traceparent", TRACEPARENT),))
    backend, server = spans.get_finished_spans()  # in the order they ended
    assert (server.kind, backend.kind) == (SpanKind.SERVER, SpanKind.CLIENT)
    trace_id, server_id, parent = _hex(server)
    assert (trace_id, parent) == (TRACE, PARENT)
    assert _hex(backend)[0::2] == (TRACE, server_id)
    [(key, value)] = transport.metadata[0]
    assert (key, value) == ("traceparent", f"00-{TRACE}-{_hex(backend)[1]}-01")
    assert server.attributes == {
        "rpc.system": "grpc",
        "rpc.service": "tensorflow.serving.PredictionService",
        "rpc.method": "Predict",
        "rpc.grpc.status_code": 0,
    }


async def test_a_retried_call_has_one_backend_span_per_attempt_with_its_status(
    spans: InMemorySpanExporter,
) -> None:
    down = rpc_error(grpc.StatusCode.UNAVAILABLE, "connection refused")
    routes, transports = _backends(down, down)
    context = await _call(routes)
    assert context.aborted is not None and context.aborted[0] == grpc.StatusCode.UNAVAILABLE
    first, second, server = spans.get_finished_spans()
    for backend in (first, second):
        assert backend.attributes is not None
        assert backend.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
        assert backend.status.status_code == StatusCode.ERROR
        assert _hex(backend)[2] == _hex(server)[1]
    # (a trace the gateway started may carry W3C's "random trace id" flag beside "sampled")
    assert {t.metadata[0][0][1].rsplit("-", 1)[0] for t in transports} == {
        f"00-{_hex(s)[0]}-{_hex(s)[1]}" for s in (first, second)
    }
    assert server.parent is None  # no traceparent from the caller: a trace of its own
    assert server.status.status_code == StatusCode.ERROR


async def test_sampled_out_records_nothing_and_says_so_downstream() -> None:
    exporter = _install(ALWAYS_OFF)
    try:
        routes, [transport] = _backends(predict_reply())
        await _call(routes)
    finally:
        tracing.shutdown()
    assert exporter.get_finished_spans() == ()
    [(key, value)] = transport.metadata[0]
    flags = int(value.rsplit("-", 1)[1], 16)
    assert key == "traceparent" and not flags & 1  # not sampled: the backend need not either


def test_a_run_links_to_the_stored_traceparent(spans: InMemorySpanExporter) -> None:
    traced = tracing.active()
    assert traced is not None
    for stored, links in ((TRACEPARENT, [(TRACE, PARENT)]), ("", []), ("00-garbage-01", [])):
        traced.linked("run", stored).end(grpc.StatusCode.OK)
        [run] = spans.get_finished_spans()
        spans.clear()
        assert run.kind == SpanKind.CONSUMER and run.parent is None
        assert _hex(run)[0] != TRACE
        assert [
            (f"{link.context.trace_id:032x}", f"{link.context.span_id:016x}") for link in run.links
        ] == links


@pytest.mark.parametrize(
    ("configured", "environ", "on"),
    [
        (False, {}, False),
        (True, {}, True),
        (False, {"OTEL_TRACES_EXPORTER": "otlp"}, True),
        (False, {"OTEL_TRACES_EXPORTER": "none"}, False),
        (True, {"OTEL_SDK_DISABLED": "true"}, False),
    ],
)
def test_on_by_config_or_environment(configured: bool, environ: dict[str, str], on: bool) -> None:
    assert tracing.wanted(configured, environ) is on


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        ("OTEL_TRACES_EXPORTER", "jaeger", "jaeger is not an exporter of this build"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc", "exports http/protobuf only"),
    ],
)
def test_what_this_build_cannot_export_fails_at_start(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, words: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(tracing.TracingError, match=words):
        tracing.setup(configured=True, service="test")
    assert tracing.active() is None


def test_setup_honours_the_environment_and_keeps_an_installed_provider(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    traced = tracing.setup(configured=False, service="modelmux-test")
    try:
        assert traced is not None
        assert traced.provider.resource.attributes["service.name"] == "modelmux-test"
        assert not traced.internal("x").is_recording()  # the sampler from OTEL_TRACES_SAMPLER
        assert tracing.setup(configured=True, service="other") is traced
    finally:
        tracing.shutdown()


def test_the_status_record_keeps_a_traceparent_only_when_there_is_one() -> None:
    plain = Status("r1", "api", "IN_QUEUE", "md5", "application/json", 1.0)
    assert b"traceparent" not in plain.encode()
    traced = Status("r1", "api", "IN_QUEUE", "md5", "application/json", 1.0, traceparent="tp")
    assert Status.decode(traced.encode()) == traced
    newer = traced.encode()[:-1] + b',"field_of_a_later_version":1}'
    assert Status.decode(newer) == traced
