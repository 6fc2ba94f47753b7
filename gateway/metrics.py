"""The gateway's Prometheus metrics (docs/metrics.md lists every one).

The request path's metrics are recorded only when ``gateway.metrics_listen`` is set: the edge,
admission and forwarding get a :class:`RequestMetrics` then, and ``None`` otherwise (nothing is
counted, no clock is read). Each keeps the label children it has bound, per route and per backend,
so a call does one dict lookup and a few increments, never a label dict. Label values stay
bounded whatever callers send: a model label is a name the gateway serves (others show as ""),
and a version label is set only on calls that succeeded (only routable versions succeed).

Rare events (retries, ejections, reloads, handler worker restarts) and the state gauges updated
on every routing table change are recorded always: they cost nothing per call. In a ``--workers
N`` gateway the values live in prometheus_client's multiprocess files (modelmux_common/metrics.py);
the gauges say how the processes' values combine (``multiprocess_mode``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import Counter, Gauge, Histogram

from gateway.transport import VersionState
from modelmux_common.metrics import LATENCY_BUCKETS, REGISTRY

if TYPE_CHECKING:
    from gateway.fleet.report import Report
    from gateway.routing import Table

# Model events reach the backends in milliseconds to minutes (a large model loading).
RELOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

REQUESTS = Counter(
    "modelmux_requests",
    "Calls the gateway answered, by gRPC service, method, model, version and status code",
    ["service", "method", "model", "version", "code"],
    registry=REGISTRY,
)
REQUEST_SECONDS = Histogram(
    "modelmux_request_duration_seconds",
    "Time from a call's arrival to its answer, by gRPC service, method and model",
    ["service", "method", "model"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
BACKEND_SECONDS = Histogram(
    "modelmux_backend_request_duration_seconds",
    "Time of one call to a backend (each attempt of a retried call), by backend",
    ["backend"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
BACKEND_ERRORS = Counter(
    "modelmux_backend_errors",
    "Backend calls that ended with a gRPC error, by backend and status code",
    ["backend", "code"],
    registry=REGISTRY,
)
INFLIGHT = Gauge(
    "modelmux_inflight_calls",
    "Calls admitted and not yet answered, counted against a limit (sampled twice a second)",
    ["limit"],
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
REJECTED = Counter(
    "modelmux_admission_rejections",
    "Calls refused with RESOURCE_EXHAUSTED, by the limit that was reached",
    ["limit"],
    registry=REGISTRY,
)
RETRIES = Counter(
    "modelmux_backend_retries",
    "Calls retried on another backend because the first never ran them, by the first backend",
    ["backend"],
    registry=REGISTRY,
)
EJECTIONS = Counter(
    "modelmux_backend_ejections",
    "Times a backend was ejected from routing after consecutive failures",
    ["backend"],
    registry=REGISTRY,
)
BATCH_CALLS = Histogram(
    "modelmux_batch_calls",
    "Calls merged into one backend call by server-side batching, by model",
    ["model"],
    buckets=BATCH_BUCKETS,
    registry=REGISTRY,
)
BATCH_ROWS = Histogram(
    "modelmux_batch_rows",
    "Rows (the first dimension) of one batched backend call, by model",
    ["model"],
    buckets=BATCH_BUCKETS,
    registry=REGISTRY,
)
VERSIONS = Gauge(
    "modelmux_backend_model_versions",
    "Model versions each backend reported in its last status poll, by state",
    ["backend", "state"],
    multiprocess_mode="livemax",
    registry=REGISTRY,
)
ROUTABLE = Gauge(
    "modelmux_routable_versions",
    "Model versions the routing table sends calls to, by backend",
    ["backend"],
    multiprocess_mode="livemax",
    registry=REGISTRY,
)
RELOAD_EVENTS = Counter(
    "modelmux_reload_events",
    "Model events received from modelsync, by kind",
    ["kind"],
    registry=REGISTRY,
)
RELOAD_SECONDS = Histogram(
    "modelmux_reload_to_routable_seconds",
    "Time from a published version's modelsync event reaching the gateway to its being routable",
    buckets=RELOAD_BUCKETS,
    registry=REGISTRY,
)
HANDLER_RESTARTS = Counter(
    "modelmux_handler_worker_restarts",
    "Handler worker processes that exited and were replaced, by API",
    ["api"],
    registry=REGISTRY,
)
HANDLER_SECONDS = Histogram(
    "modelmux_handler_call_duration_seconds",
    "Time of one call to a handler worker, by API and status code",
    ["api", "code"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)

OK = grpc.StatusCode.OK
# How often the in-flight gauges are read from the request path's own counts.
SAMPLE_SECONDS = 0.5


class Route:
    """One RPC's request counter and latency histogram, with the children bound so far."""

    __slots__ = ("_children", "_known", "method", "service")

    def __init__(self, rpc: str, known: Callable[[str], bool]) -> None:
        self.service, _, self.method = rpc.rpartition("/")
        self._known = known
        self._children: dict[tuple[str, int, grpc.StatusCode], tuple[Any, Any]] = {}

    def observe(self, model: str, version: int, code: grpc.StatusCode, seconds: float) -> None:
        key = (model, version, code)
        pair = self._children.get(key)
        if pair is None:
            pair = self._bind(model, version, code)
        pair[0].inc()
        pair[1].observe(seconds)

    def _bind(self, model: str, version: int, code: grpc.StatusCode) -> tuple[Any, Any]:
        known = bool(model) and self._known(model)
        shown = model if known else ""
        pinned = str(version) if known and version and code is OK else ""
        pair = (
            REQUESTS.labels(self.service, self.method, shown, pinned, code.name),
            REQUEST_SECONDS.labels(self.service, self.method, shown),
        )
        if known and (not version or code is OK):  # only bounded keys are kept
            self._children[(model, version, code)] = pair
        return pair


class RequestMetrics:
    """What the request path records per call when metrics are on."""

    def __init__(self, known: Callable[[str], bool]) -> None:
        self.known = known
        self.rejected = {
            limit: REJECTED.labels(limit)
            for limit in ("gateway.max_inflight", "gateway.backend_max_inflight")
        }
        self._backends: dict[str, Any] = {}
        self._inflight: dict[str, Any] = {}
        self._errors: dict[tuple[str, grpc.StatusCode], Any] = {}

    def route(self, rpc: str) -> Route:
        return Route(rpc, self.known)

    def backend(self, name: str) -> Any:
        """The latency histogram's child of one backend."""
        child = self._backends.get(name)
        if child is None:
            child = self._backends[name] = BACKEND_SECONDS.labels(name)
        return child

    async def sample(self, inflight: Callable[[], Iterable[tuple[str, int]]]) -> None:
        """Copies the request path's in-flight counts, (limit, calls) from ``inflight``, into
        the gauge every SAMPLE_SECONDS: the counts are the plain integers admission and
        forwarding keep anyway, so a call pays nothing for the gauge."""
        while True:
            for limit, calls in inflight():
                child = self._inflight.get(limit)
                if child is None:
                    child = self._inflight[limit] = INFLIGHT.labels(limit)
                child.set(calls)
            await asyncio.sleep(SAMPLE_SECONDS)

    def backend_error(self, name: str, code: grpc.StatusCode) -> None:
        child = self._errors.get((name, code))
        if child is None:
            child = self._errors[(name, code)] = BACKEND_ERRORS.labels(name, code.name)
        child.inc()


class Reloads:
    """Times each published version from its event's arrival to its first routable table."""

    def __init__(self) -> None:
        self._pending: dict[tuple[str, int, str], float] = {}

    def event(self, kind: str, *, model: str = "", version: int = 0, servable: str = "") -> None:
        RELOAD_EVENTS.labels(kind).inc()
        if servable:
            self._pending[(model, version, servable)] = time.monotonic()

    def routable(self, routed: Callable[[str, int, str], bool]) -> None:
        """Observes every pending version that ``routed(model, version, servable)`` now."""
        if not self._pending:
            return
        now = time.monotonic()
        for key, since in list(self._pending.items()):
            if routed(*key):
                RELOAD_SECONDS.observe(now - since)
                del self._pending[key]

    def forget(self, model: str, version: int | None = None) -> None:
        """A withdrawn version (or model) is no longer waited for."""
        for key in [k for k in self._pending if k[0] == model and version in (None, k[1])]:
            del self._pending[key]


RELOADS = Reloads()


def note_table(table: Table, reports: Iterable[Report]) -> None:
    """The metrics of model state, on every new routing table: versions per backend and state,
    routable versions per backend, and the reloads that became routable."""
    versions: dict[tuple[str, str], int] = {}
    for report in reports:
        for statuses in report.reported.values():
            for status in statuses.values():
                key = (report.name, _state_name(status.state))
                versions[key] = versions.get(key, 0) + 1
    routable: dict[tuple[str], int] = {}
    served: set[tuple[str, int, str]] = set()
    for route in table.routes.values():
        for version, targets in route.versions.items():
            for target in targets:
                routable[(target.backend.name,)] = routable.get((target.backend.name,), 0) + 1
                served.add((route.model, version, target.servable))
    set_states(versions, routable)
    RELOADS.routable(lambda model, version, servable: (model, version, servable) in served)


def _state_name(state: int) -> str:
    """TF Serving's name of a version state (a number from a newer server shown as it is)."""
    try:
        return str(VersionState.Name(state))
    except ValueError:
        return str(state)


def set_states(versions: dict[tuple[str, str], int], routable: dict[tuple[str], int]) -> None:
    """The state gauges: versions by (backend, state), routable versions by (backend,); a
    combination not listed any more is set to 0 (multiprocess files cannot drop a child)."""
    _set_all(VERSIONS, versions, _SEEN_VERSIONS)
    _set_all(ROUTABLE, routable, _SEEN_ROUTABLE)


def _set_all(gauge: Gauge, values: dict[Any, int], seen: set[Any]) -> None:
    for labels, count in values.items():
        gauge.labels(*labels).set(count)
    for labels in seen - values.keys():
        gauge.labels(*labels).set(0)
    seen.clear()
    seen.update(values)


_SEEN_VERSIONS: set[tuple[str, str]] = set()
_SEEN_ROUTABLE: set[tuple[str]] = set()
