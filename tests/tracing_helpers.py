"""Tracing tests' pieces: an OTLP/HTTP collector on loopback (handler workers export to it from
their own processes) and one shape for spans from either side, the collector or the SDK's
in-memory exporter."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind

# OTLP's span kinds (SPAN_KIND_INTERNAL = 1, ...) in the SDK's terms
_KINDS = {1: SpanKind.INTERNAL, 2: SpanKind.SERVER, 3: SpanKind.CLIENT, 5: SpanKind.CONSUMER}


@dataclass(frozen=True)
class Seen:
    """One span as the test compares them: ids in hex, where it was recorded."""

    name: str
    kind: SpanKind
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root
    attributes: dict[str, Any]
    links: tuple[tuple[str, str], ...] = ()  # (trace id, span id) of each link
    where: str = "gateway"


def from_sdk(span: ReadableSpan) -> Seen:
    context = span.get_span_context()
    assert context is not None
    return Seen(
        name=span.name,
        kind=span.kind,
        trace_id=f"{context.trace_id:032x}",
        span_id=f"{context.span_id:016x}",
        parent_id="" if span.parent is None else f"{span.parent.span_id:016x}",
        attributes=dict(span.attributes or {}),
        links=tuple(
            (f"{link.context.trace_id:032x}", f"{link.context.span_id:016x}") for link in span.links
        ),
    )


def _value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def _from_otlp(span: Any, service: str) -> Seen:
    return Seen(
        name=span.name,
        kind=_KINDS[span.kind],
        trace_id=span.trace_id.hex(),
        span_id=span.span_id.hex(),
        parent_id=span.parent_span_id.hex(),
        attributes={a.key: _value(a.value) for a in span.attributes},
        links=tuple((link.trace_id.hex(), link.span_id.hex()) for link in span.links),
        where=service,
    )


@dataclass
class Collector:
    """OTLP over HTTP/protobuf: every span exported to ``endpoint`` lands in ``spans``."""

    server: ThreadingHTTPServer
    spans: list[Seen] = field(default_factory=list)
    requests: int = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def receive(self, body: bytes) -> None:
        request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            attributes = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            service = str(attributes.get("service.name", ""))
            for scope in resource_spans.scope_spans:
                self.spans.extend(_from_otlp(s, service) for s in scope.spans)
        self.requests += 1


def collector() -> Iterator[Collector]:
    """A collector on a free loopback port for the duration of a fixture."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            if self.path != "/v1/traces":
                self.send_error(404)
                return
            found.receive(body)
            reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    found = Collector(server)
    thread = threading.Thread(target=server.serve_forever, name="otlp-collector", daemon=True)
    thread.start()
    try:
        yield found
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def by_id(spans: list[Seen]) -> dict[str, Seen]:
    return {s.span_id: s for s in spans}


def chain(spans: list[Seen], leaf: Seen) -> list[Seen]:
    """``leaf`` and its ancestors among ``spans``, root first (stops at a parent not among them)."""
    index, out = by_id(spans), [leaf]
    while out[-1].parent_id in index:
        out.append(index[out[-1].parent_id])
    return out[::-1]
