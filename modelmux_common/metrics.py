"""Prometheus metrics: the gateway's ``/metrics`` endpoint and the handlers' ``metrics_client``.

The gateway's own metrics live in :data:`REGISTRY`. Handler workers are processes of their own:
they write their metrics with prometheus_client's multiprocess mode (one memory-mapped file per
process) into a folder the gateway gives them in ``PROMETHEUS_MULTIPROC_DIR``, and the gateway's
``/metrics`` reads that folder beside its own registry. Nothing crosses the worker channel, and a
worker that dies keeps its counts (its files stay until the gateway exits). The endpoint is off
unless ``gateway.metrics_listen`` is set.

``modelmux gateway --workers N`` uses the same mode for the gateway processes themselves: the
supervisor gives every worker one folder, serves ``/metrics`` from that folder alone, and the
workers (and their handler workers) write into it, so one scrape sees the sum over processes
(docs/metrics.md). modelsync and the embedded backend serve their own registry the same way
(``modelsync.metrics_listen``, ``backends[].metrics_listen``).
"""

from __future__ import annotations

import errno
import os
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from modelmux_common.listen import ListenError, in_use, split

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
REGISTRY = CollectorRegistry()
# Latency buckets of every daemon's call histograms: from 100 µs (a hop of the gateway itself)
# to a minute (a slow handler), so sub-millisecond hops are resolved.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
_INVALID = re.compile(r"[^a-zA-Z0-9_]")


def multiprocess() -> bool:
    """True in a process whose metrics live in ``PROMETHEUS_MULTIPROC_DIR`` (a ``--workers N``
    gateway worker, a handler worker): prometheus_client chose so when it was imported."""
    from prometheus_client import values

    return values.ValueClass is not values.MutexValue


class _Both(Collector):
    def __init__(self, folder: str, *, own: bool) -> None:
        self.own = own
        self.workers = MultiProcessCollector(None, path=folder) if folder else None  # type: ignore[no-untyped-call]

    def collect(self) -> Iterator[Metric]:
        if self.own:
            yield from REGISTRY.collect()
        if self.workers is not None:
            yield from self.workers.collect()  # type: ignore[no-untyped-call]


class Endpoint:
    """``/metrics`` over HTTP on ``address`` (host:port; port 0 picks one: see ``port``): this
    process's :data:`REGISTRY` (unless ``own`` is False), the multiprocess files in
    ``worker_folder`` when given, and ``collectors``. A busy address raises :class:`ListenError` naming it and the
    config key (``key``) that set it."""

    def __init__(
        self,
        address: str,
        worker_folder: str = "",
        *,
        key: str,
        own: bool = True,
        collectors: Sequence[Collector] = (),
    ) -> None:
        try:
            host, port = split(address)
        except ListenError as exc:
            raise ListenError(f"{key}: {exc}") from None
        if worker_folder:
            os.makedirs(worker_folder, exist_ok=True)
        registry = CollectorRegistry()
        registry.register(_Both(worker_folder, own=own))
        for collector in collectors:  # read at scrape time (e.g. the backend's model states)
            registry.register(collector)
        try:
            self._server, self._thread = start_http_server(
                port, addr=host or "127.0.0.1", registry=registry
            )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ListenError(f"{key}: {in_use(address)}") from None
            raise ListenError(f"{key}: cannot listen on {address}: {exc.strerror}") from None
        self.port: int = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def _name(text: str) -> str:
    clean = _INVALID.sub("_", text)
    return clean if clean and not clean[0].isdigit() else f"_{clean}"


class HandlerMetrics:
    """The seeds' metrics_client in a handler worker: ``increment``, ``gauge``, ``histogram``,
    each with optional tags (label names and values). Metrics are created on first use; a name
    with several sets of tag names is one metric per set (Prometheus shows them side by side).
    Without ``PROMETHEUS_MULTIPROC_DIR`` (no endpoint configured) the calls change nothing."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get(MULTIPROC_ENV))
        self._metrics: dict[tuple[str, str, tuple[str, ...]], Any] = {}
        self._lock = threading.Lock()

    def _metric(self, kind: str, name: str, tags: Mapping[str, str] | None) -> Any:
        from prometheus_client import Counter, Gauge, Histogram

        labels = {_name(k): str(v) for k, v in (tags or {}).items()}
        key = (kind, _name(name), tuple(sorted(labels)))
        with self._lock:
            metric = self._metrics.get(key)
            if metric is None:
                help_text = f"handler metric {name}"
                if kind == "counter":
                    metric = Counter(key[1], help_text, key[2], registry=None)
                elif kind == "gauge":
                    metric = Gauge(
                        key[1], help_text, key[2], registry=None, multiprocess_mode="mostrecent"
                    )
                else:
                    metric = Histogram(key[1], help_text, key[2], registry=None)
                self._metrics[key] = metric
        return metric.labels(**labels) if labels else metric

    def put(self, kind: str, name: str, value: float, tags: Mapping[str, str] | None) -> None:
        if not self.enabled:
            return
        metric = self._metric(kind, name, tags)
        if kind == "counter":
            metric.inc(value)
        elif kind == "gauge":
            metric.set(value)
        else:
            metric.observe(value)
