"""OpenTelemetry tracing of the request path (docs/tracing.md).

Off by default, and then free: nothing of OpenTelemetry is imported, :func:`active` is None, and
the request path holds None where a span would be (the edge decides once, when it is built).
On with ``gateway.tracing: true`` or when ``OTEL_TRACES_EXPORTER`` names an exporter; the SDK's
standard ``OTEL_*`` variables configure the rest (sampler, OTLP endpoint, headers, batching,
resource). Each process sets it up once at start, before it builds its servers: the gateway (each
``--workers`` process), every handler worker and every batch worker, each exporting its own spans.

Context crosses processes as W3C ``traceparent`` (and ``tracestate``) gRPC metadata: from the
caller to the gateway, from the gateway to a backend and to a handler worker, from a handler's
``tensorflow_client`` back to the gateway. Across a queue (async requests, batch jobs) the
submit's traceparent is stored with the request or job (:func:`Tracing.traceparent`), and the
span of each run links to it (:func:`Tracing.linked`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
_CONTEXT_KEYS = (TRACEPARENT, TRACESTATE)
EXPORTERS = ("otlp", "console", "none")
_PROTOCOL = "http/protobuf"
# Server codes that are the server's fault (OpenTelemetry's RPC conventions); on a client span
# every code but OK is an error.
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)

Metadata = tuple[tuple[str, str], ...]


class TracingError(Exception):
    """The OTEL_* environment asks for something this build does not do (the message says what)."""


class Tracing:
    """The process's tracer and the few operations the request path needs."""

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry import trace
        from opentelemetry.context import Context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.tracer = provider.get_tracer("modelmux")
        self._trace = trace
        self._propagator = TraceContextTextMapPropagator()
        self._server, self._client = trace.SpanKind.SERVER, trace.SpanKind.CLIENT
        self._consumer = trace.SpanKind.CONSUMER
        self._root = Context()  # no parent: a caller that sent no traceparent starts a trace

    # -- context in and out ------------------------------------------------------------------

    def _parent(self, metadata: Iterable[tuple[str, Any]] | None) -> Any:
        """The context a caller's metadata carries (an empty one without ``traceparent``)."""
        carrier = {k: str(v) for k, v in metadata or () if k in _CONTEXT_KEYS}
        return self._propagator.extract(carrier) if carrier else self._root

    def headers(self, span: Span | None = None) -> Metadata:
        """``traceparent`` (and ``tracestate``) of ``span``, or of the current span: W3C's
        format written here directly (the propagator's inject costs a few microseconds more)."""
        context = (self._trace.get_current_span() if span is None else span).get_span_context()
        if not context.is_valid:
            return ()
        parent = f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
        if not context.trace_state:
            return ((TRACEPARENT, parent),)
        return ((TRACEPARENT, parent), (TRACESTATE, context.trace_state.to_header()))

    def traceparent(self, span: Span | None) -> str:
        """The span's W3C traceparent, to store with work that runs later ("" for None)."""
        if span is None:
            return ""
        return dict(self.headers(span)).get(TRACEPARENT, "")

    # -- spans -------------------------------------------------------------------------------

    def server(self, rpc: str, metadata: Iterable[tuple[str, Any]] | None) -> Span:
        """The span of one served call, ``rpc`` being ``service/method``; the caller's
        ``traceparent`` is its parent."""
        service, _, method = rpc.rpartition("/")
        return self.tracer.start_span(
            rpc,
            self._parent(metadata),
            self._server,
            {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
        )

    def client(
        self,
        service: str,
        method: str,
        parent: Span | None,
        attributes: Mapping[str, Any] | None = None,
    ) -> Client:
        """A call to ``service/method`` made on behalf of ``parent`` (None: the current span).
        Under a parent that was sampled out no span is made: the callee gets the parent's
        context, which says "not sampled" all the same (the standard samplers decide a child
        as its parent or its trace id decided)."""
        if parent is not None and not parent.is_recording():
            return Client(self, parent)  # its end() does nothing: the parent is not recorded
        context = None if parent is None else self._trace.set_span_in_context(parent)
        span = self.tracer.start_span(
            f"{service}/{method}",
            context,
            self._client,
            {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method, **(attributes or {})},
        )  # fmt: skip
        return Client(self, span)

    def internal(self, name: str, attributes: Mapping[str, Any] | None = None) -> Span:
        """A span of work inside this process, under the current span."""
        return self.tracer.start_span(name, None, attributes=attributes)

    def linked(
        self, name: str, traceparent: str, attributes: Mapping[str, Any] | None = None
    ) -> Client:
        """The span of queued work handed to a worker: a trace of its own, linked to the span
        that queued it (its stored ``traceparent``; no link when there is none)."""
        links: Sequence[Any] = ()
        if traceparent:
            queued = self._trace.get_current_span(self._parent(((TRACEPARENT, traceparent),)))
            if queued.get_span_context().is_valid:
                links = (self._trace.Link(queued.get_span_context()),)
        span = self.tracer.start_span(name, self._root, self._consumer, attributes, links)
        return Client(self, span)

    def end(self, span: Span, code: grpc.StatusCode, *, server: bool = True) -> None:
        """Ends a call's span with its gRPC status."""
        if span.is_recording():
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code in _SERVER_ERRORS or (not server and code != grpc.StatusCode.OK):
                span.set_status(self._trace.StatusCode.ERROR, code.name)
        span.end()

    def current(self, span: Span) -> object:
        """Makes ``span`` the current one on this thread or task; returns the token to pass to
        :meth:`restore`."""
        from opentelemetry import context

        return context.attach(self._trace.set_span_in_context(span))

    @staticmethod
    def restore(token: object) -> None:
        from opentelemetry import context

        context.detach(token)  # type: ignore[arg-type]


class Client:
    """A call's client span and the metadata that carries it to the callee."""

    __slots__ = ("headers", "span", "tracing")

    def __init__(self, tracing: Tracing, span: Span) -> None:
        self.tracing = tracing
        self.span = span
        self.headers = tracing.headers(span)

    def end(self, code: grpc.StatusCode) -> None:
        self.tracing.end(self.span, code, server=False)


_active: Tracing | None = None


def active() -> Tracing | None:
    """The process's tracing, or None when it is off."""
    return _active


def wanted(configured: bool, environ: Mapping[str, str] | None = None) -> bool:
    """On when the config says so or ``OTEL_TRACES_EXPORTER`` names an exporter; never with
    ``OTEL_SDK_DISABLED=true``."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    named = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    return configured or named not in ("", "none")


def install(provider: TracerProvider) -> Tracing:
    """Traces this process with ``provider`` (tests pass one with the SDK's in-memory exporter;
    :func:`setup` then keeps it)."""
    global _active
    _active = Tracing(provider)
    return _active


def setup(*, configured: bool, service: str) -> Tracing | None:
    """Tracing for this process as its config and environment ask (None: off). Raises
    :class:`TracingError` for an exporter or protocol this build lacks."""
    if _active is not None:
        return _active
    if not wanted(configured):
        return None
    exporters = _exporters(os.environ)
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service}))
    provider = TracerProvider(resource=resource)  # the sampler: OTEL_TRACES_SAMPLER(_ARG)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))  # OTEL_BSP_*
    from opentelemetry import trace

    trace.set_tracer_provider(provider)  # a handler's own spans (the global API) join ours
    return install(provider)


def _exporters(env: Mapping[str, str]) -> list[Any]:
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",")]
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        raise TracingError(
            f"OTEL_TRACES_EXPORTER={env['OTEL_TRACES_EXPORTER']!r}: {', '.join(unknown)} is not "
            f"an exporter of this build ({', '.join(EXPORTERS)})"
        )
    out: list[Any] = []
    if "otlp" in names:
        for key in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
            protocol = env.get(key, "").strip()
            if protocol and protocol != _PROTOCOL:
                raise TracingError(f"{key}={protocol!r}: this build exports {_PROTOCOL} only")
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        out.append(OTLPSpanExporter())  # OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, _HEADERS, ...
    if "console" in names:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        out.append(ConsoleSpanExporter())
    return out


def shutdown() -> None:
    """Exports what is still buffered and stops tracing (at process exit)."""
    global _active
    if _active is not None:
        _active.provider.shutdown()
        _active = None
