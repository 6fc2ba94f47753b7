"""gateway/metrics.py: bounded label values whatever callers send, the reload clock, and state
gauges that drop to 0 when a combination goes away."""

from __future__ import annotations

from pathlib import Path

import grpc

from gateway.metrics import Reloads, RequestMetrics, set_states
from modelmux_common.config import load
from modelmux_common.metrics import REGISTRY

OK, NOT_FOUND = grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_label_values_stay_bounded() -> None:
    metrics = RequestMetrics(lambda name: name == "known")
    route = metrics.route("unit.Service/Call")
    ids = {"service": "unit.Service", "method": "Call"}
    for _ in range(2):
        route.observe("known", 3, OK, 0.0004)
    route.observe("known", 99, NOT_FOUND, 0.0001)  # a version that does not exist
    for n in range(50):
        route.observe(f"random-{n}", n, NOT_FOUND, 0.0001)
    route.observe("x" * 10_000, 7, OK, 0.0001)
    total = "modelmux_requests_total"
    assert sample(total, **ids, model="known", version="3", code="OK") == 2
    assert sample(total, **ids, model="known", version="", code="NOT_FOUND") == 1
    assert sample(total, **ids, model="", version="", code="NOT_FOUND") == 50
    assert sample(total, **ids, model="", version="", code="OK") == 1
    assert sample("modelmux_request_duration_seconds_count", **ids, model="known") == 3
    assert (
        sample("modelmux_request_duration_seconds_bucket", **ids, model="known", le="0.0005") == 3
    )
    assert (
        sample("modelmux_request_duration_seconds_bucket", **ids, model="known", le="0.0001") == 1
    )
    served = {s.labels.get("model") for m in REGISTRY.collect() for s in m.samples}
    assert not {m for m in served if m and m.startswith(("random-", "xxx"))}
    assert len(route._children) == 1  # only bounded keys are kept bound


def test_backend_errors_and_latency_by_backend() -> None:
    metrics = RequestMetrics(lambda name: True)
    metrics.backend("b-unit").observe(0.002)
    metrics.backend_error("b-unit", grpc.StatusCode.UNAVAILABLE)
    metrics.backend_error("b-unit", grpc.StatusCode.UNAVAILABLE)
    assert metrics.backend("b-unit") is metrics.backend("b-unit")
    assert sample("modelmux_backend_request_duration_seconds_count", backend="b-unit") == 1
    assert sample("modelmux_backend_errors_total", backend="b-unit", code="UNAVAILABLE") == 2


def test_a_reload_is_timed_once_from_its_event_to_routable() -> None:
    reloads = Reloads()
    count = "modelmux_reload_to_routable_seconds_count"
    before, events = sample(count), sample("modelmux_reload_events_total", kind="K_UNIT")
    reloads.event("K_UNIT", model="m", version=2, servable="m@r5")
    reloads.event("K_UNIT", model="gone", version=1, servable="gone")
    reloads.forget("gone")
    reloads.routable(lambda model, version, servable: False)
    assert sample(count) == before
    routed = {("m", 2, "m@r5")}
    reloads.routable(lambda *key: key in routed)
    reloads.routable(lambda *key: True)  # observed once; the withdrawn one never
    assert sample(count) == before + 1
    assert sample("modelmux_reload_events_total", kind="K_UNIT") == events + 2


def test_state_gauges_drop_to_zero_when_a_combination_goes() -> None:
    set_states({("u-0", "AVAILABLE"): 2, ("u-0", "LOADING"): 1}, {("u-0",): 2, ("u-1",): 1})
    assert sample("modelmux_backend_model_versions", backend="u-0", state="LOADING") == 1
    set_states({("u-0", "AVAILABLE"): 3}, {("u-0",): 3})
    assert sample("modelmux_backend_model_versions", backend="u-0", state="AVAILABLE") == 3
    assert sample("modelmux_backend_model_versions", backend="u-0", state="LOADING") == 0
    assert sample("modelmux_routable_versions", backend="u-1") == 0


def test_make_run_serves_metrics_from_every_daemon() -> None:
    """examples/quickstart/modelmux.yaml (`make run`): an endpoint per daemon, on fixed ports."""
    quickstart = Path(__file__).resolve().parents[2] / "examples" / "quickstart" / "modelmux.yaml"
    config = load(str(quickstart))
    addresses = [
        config.gateway.metrics_listen,
        config.modelsync.metrics_listen,
        *(b.metrics_listen for b in config.backends),
    ]
    assert addresses == ["127.0.0.1:8530", "127.0.0.1:8531", "127.0.0.1:8532"]
