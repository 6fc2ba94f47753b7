"""The embedded backend's Prometheus metrics (docs/metrics.md); served on the backend entry's
``metrics_listen`` (modelmux_common/metrics.py). Label values are bounded: methods and status
codes, and the version states of the models it serves."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from modelmux_common.metrics import LATENCY_BUCKETS, REGISTRY

REQUESTS = Counter(
    "modelmux_embedded_requests",
    "Calls the embedded backend answered, by method and status code",
    ["method", "code"],
    registry=REGISTRY,
)
REQUEST_SECONDS = Histogram(
    "modelmux_embedded_request_duration_seconds",
    "Time the embedded backend took to answer a call, by method",
    ["method"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
LOAD_SECONDS = Histogram(
    "modelmux_embedded_load_duration_seconds",
    "Time to load one model version, by outcome (loaded, failed)",
    ["outcome"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
    registry=REGISTRY,
)


class States(Collector):
    """``modelmux_embedded_model_versions{state}``, read from the manager at scrape time."""

    def __init__(self, counts: Callable[[], Mapping[str, int]]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "modelmux_embedded_model_versions",
            "Model versions the embedded backend holds, by state (GetModelStatus's names)",
            labels=["state"],
        )
        for state, count in sorted(self.counts().items()):
            family.add_metric([state], count)
        yield family
