"""Prometheus metrics: the gateway's ``/metrics`` endpoint and the handlers' ``metrics_client``.

The gateway's own metrics live in :data:`REGISTRY`. Handler workers are processes of their own:
they write their metrics with prometheus_client's multiprocess mode (one memory-mapped file per
process) into a folder the gateway gives them in ``PROMETHEUS_MULTIPROC_DIR``, and the gateway's
``/metrics`` reads that folder beside its own registry. Nothing crosses the worker channel, and a
worker that dies keeps its counts (its files stay until the gateway exits). The endpoint is off
unless ``gateway.metrics_listen`` is set.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
REGISTRY = CollectorRegistry()
_INVALID = re.compile(r"[^a-zA-Z0-9_]")


class _Both(Collector):
    def __init__(self, folder: str) -> None:
        self.workers = MultiProcessCollector(None, path=folder) if folder else None  # type: ignore[no-untyped-call]

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()
        if self.workers is not None:
            yield from self.workers.collect()  # type: ignore[no-untyped-call]


class Endpoint:
    """``/metrics`` over HTTP on ``address`` (host:port; port 0 picks one: see ``port``), with
    the handler workers' metrics from ``worker_folder`` when given."""

    def __init__(self, address: str, worker_folder: str) -> None:
        host, _, port = address.rpartition(":")
        if worker_folder:
            os.makedirs(worker_folder, exist_ok=True)
        registry = CollectorRegistry()
        registry.register(_Both(worker_folder))
        self._server, self._thread = start_http_server(
            int(port), addr=host.strip("[]") or "127.0.0.1", registry=registry
        )
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
