"""modelsync's Prometheus metrics, per source (docs/metrics.md); served on
``modelsync.metrics_listen`` (modelmux_common/metrics.py)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from modelmux_common.metrics import REGISTRY

SYNC_SECONDS = Histogram(
    "modelmux_modelsync_sync_duration_seconds",
    "Time of one sync pass over a source (list, fetch, verify, publish), by source",
    ["source"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
    registry=REGISTRY,
)
DOWNLOADED = Counter(
    "modelmux_modelsync_downloaded_bytes",
    "Bytes fetched from a source for the versions published (reused files not counted)",
    ["source"],
    registry=REGISTRY,
)
PUBLISHED = Counter(
    "modelmux_modelsync_published_versions",
    "Versions published (added or updated) from a source",
    ["source"],
    registry=REGISTRY,
)
ERRORS = Counter(
    "modelmux_modelsync_sync_errors",
    "Sync passes over a source that failed (listing or a transfer), by source",
    ["source"],
    registry=REGISTRY,
)
LAST_SUCCESS = Gauge(
    "modelmux_modelsync_last_success_timestamp_seconds",
    "Unix time of the last sync pass over a source that succeeded, by source",
    ["source"],
    registry=REGISTRY,
)
