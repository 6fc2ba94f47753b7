"""Prometheus metrics from a running stack: modelsync (a local source folder), an embedded backend
and a gateway following modelsync, each with its own /metrics endpoint. Known traffic, a reload
and an admission rejection must show up as counts by label; ``--workers 2`` must add up; a busy
metrics address must stop a daemon with a message naming it."""

from __future__ import annotations

import asyncio
import collections
import shutil
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from backend_helpers import floats, predict_request, spec
from conftest import MODELMUX, ROOT, Proc, start_daemon
from gateway_helpers import wait_for, wait_serving, write_config
from modelsync_helpers import free_port
from prometheus_client.parser import text_string_to_metric_families

from backend.tfserving import predict_pb2

PREDICT = "/tensorflow.serving.PredictionService/Predict"
FACADE = {"service": "tensorflow.serving.PredictionService", "method": "Predict"}
# the embedded backend holds each Predict this long (its device stand-in), so that two calls at
# once meet the gateway's in-flight limit of 1
DEVICE_TIME = "300ms"


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of one /metrics page, by (name, labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
    wanted = set(labels.items())
    return sum(v for (n, got), v in samples.items() if n == name and wanted <= got)


def metrics_port(proc: Proc) -> int:
    [line] = [entry for entry in proc.lines if entry.get("event") == "metrics"]
    return int(str(line["port"]))


def predict(channel: grpc.Channel, model: str, version: int | None = None) -> grpc.StatusCode:
    call = channel.unary_unary(
        PREDICT,
        request_serializer=predict_pb2.PredictRequest.SerializeToString,
        response_deserializer=predict_pb2.PredictResponse.FromString,
    )
    try:
        call(predict_request(spec(model, version=version), x=floats([1.0, 2.0])), timeout=30)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, example_models: Path
) -> Iterator[tuple[Path, Proc, Proc, Proc]]:
    root = tmp_path_factory.mktemp("metrics")
    source = root / "source" / "half_plus_two"
    shutil.copytree(example_models / "half_plus_two" / "1", source / "1")
    config = root / "modelmux.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "gateway": {
                    "listen": "127.0.0.1:0",
                    "status_interval": "200ms",
                    "max_inflight": 1,
                    "metrics_listen": "127.0.0.1:0",
                },
                "modelsync": {
                    "listen": "127.0.0.1:0",
                    "target": str(root / "volume"),
                    "settle": "0s",
                    "debounce": "200ms",
                    "metrics_listen": "127.0.0.1:0",
                },
                "backends": [
                    {
                        "name": "cpu-0",
                        "address": f"127.0.0.1:{free_port()}",
                        "metrics_listen": "127.0.0.1:0",
                    }
                ],
                "apis": [
                    {
                        "name": "hpt",
                        "handler": {
                            "models": {"paths": [{"name": "half_plus_two", "path": str(source)}]}
                        },
                    }
                ],
            }
        )
    )
    backend = start_daemon(
        ["backend", "--config", str(config), "--name", "cpu-0", "--device-time", DEVICE_TIME]
    )
    sync = start_daemon(["sync", "--config", str(config)])
    gateway = start_daemon(
        ["gateway", "--config", str(config)],
        env={"MODELMUX_GATEWAY_MODELSYNC": sync.address},
    )
    wait_serving(gateway.address)
    yield source, gateway, sync, backend
    for proc in (gateway, sync, backend):
        proc.stop()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
OK = grpc.StatusCode.OK


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def test_calls_are_counted_by_service_method_model_version_and_code(
    stack: tuple[Path, Proc, Proc, Proc],
) -> None:
    _, gateway, _, _ = stack
    port = metrics_port(gateway)
    before = scrape(port)
    with grpc.insecure_channel(gateway.address) as channel:
        codes = [predict(channel, "half_plus_two", 1) for _ in range(3)]
        codes += [predict(channel, "no_such_model"), predict(channel, "x" * 10_000)]
    after = scrape(port)
    assert codes == [OK] * 3 + [grpc.StatusCode.NOT_FOUND] * 2
    served = {**FACADE, "model": "half_plus_two"}
    assert delta(before, after, "modelmux_requests_total", **served, version="1", code="OK") == 3
    # a model the gateway does not serve is counted without its name (bounded label values)
    unknown = {**FACADE, "model": "", "version": "", "code": "NOT_FOUND"}
    assert delta(before, after, "modelmux_requests_total", **unknown) == 2
    assert not any("no_such_model" in str(labels) or "xxx" in str(labels) for _, labels in after)
    latency = "modelmux_request_duration_seconds"
    assert delta(before, after, f"{latency}_count", **served) == 3
    assert (f"{latency}_bucket", frozenset({**served, "le": "0.0001"}.items())) in after
    backend = "modelmux_backend_request_duration_seconds"
    assert delta(before, after, f"{backend}_count", backend="cpu-0") == 3
    assert delta(before, after, f"{backend}_sum", backend="cpu-0") >= 0.9  # 3 x the device time
    for limit in ("gateway.max_inflight", "backend:cpu-0"):  # (sampled twice a second)
        assert ("modelmux_inflight_calls", frozenset({"limit": limit}.items())) in after
        await wait_for(
            lambda limit=limit: value(scrape(port), "modelmux_inflight_calls", limit=limit) == 0,
            timeout=5,
            what=f"nothing in flight against {limit}",
        )


async def test_an_admission_rejection_is_counted_by_limit(
    stack: tuple[Path, Proc, Proc, Proc],
) -> None:
    _, gateway, _, _ = stack
    port = metrics_port(gateway)
    before = scrape(port)
    request = predict_request(spec("half_plus_two", version=1), x=floats([1.0]))
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        call = channel.unary_unary(
            PREDICT,
            request_serializer=predict_pb2.PredictRequest.SerializeToString,
            response_deserializer=predict_pb2.PredictResponse.FromString,
        )
        results = await asyncio.gather(
            *(call(request, timeout=30) for _ in range(2)), return_exceptions=True
        )
    codes = sorted(r.code().name if isinstance(r, grpc.aio.AioRpcError) else "OK" for r in results)
    assert codes == ["OK", "RESOURCE_EXHAUSTED"]  # gateway.max_inflight is 1
    after = scrape(port)
    rejected = "modelmux_admission_rejections_total"
    assert delta(before, after, rejected, limit="gateway.max_inflight") == 1
    assert delta(before, after, rejected, limit="gateway.backend_max_inflight") == 0
    exhausted = {**FACADE, "model": "half_plus_two", "version": "", "code": "RESOURCE_EXHAUSTED"}
    assert delta(before, after, "modelmux_requests_total", **exhausted) == 1


async def test_a_reload_is_counted_and_timed_on_every_daemon(
    stack: tuple[Path, Proc, Proc, Proc], example_models: Path
) -> None:
    source, gateway, sync, backend = stack
    port = metrics_port(gateway)
    before = scrape(port)
    sync_before = scrape(metrics_port(sync))
    assert value(before, "modelmux_routable_versions", backend="cpu-0") == 1
    shutil.copytree(example_models / "half_plus_two" / "2", source / "2")
    with grpc.insecure_channel(gateway.address) as channel:
        await wait_for(
            lambda: predict(channel, "half_plus_two", 2) == OK, timeout=60, what="version 2 routed"
        )
    after = scrape(port)
    added = "modelmux_reload_events_total"
    assert delta(before, after, added, kind="EVENT_KIND_VERSION_ADDED") == 1
    assert delta(before, after, "modelmux_reload_to_routable_seconds_count") == 1
    assert 0 < delta(before, after, "modelmux_reload_to_routable_seconds_sum") < 60
    assert value(after, "modelmux_routable_versions", backend="cpu-0") == 2
    states = "modelmux_backend_model_versions"
    assert value(after, states, backend="cpu-0", state="AVAILABLE") == 2
    ok_v2 = {**FACADE, "model": "half_plus_two", "version": "2", "code": "OK"}
    assert value(after, "modelmux_requests_total", **ok_v2) >= 1

    synced = scrape(metrics_port(sync))
    source_id = next(
        dict(labels)["source"]
        for name, labels in synced
        if name == "modelmux_modelsync_published_versions_total"
    )
    published = "modelmux_modelsync_published_versions_total"
    assert delta(sync_before, synced, published, source=source_id) == 1
    assert value(synced, published, source=source_id) == 2
    assert delta(sync_before, synced, "modelmux_modelsync_downloaded_bytes_total") > 0
    assert value(synced, "modelmux_modelsync_sync_duration_seconds_count", source=source_id) >= 2
    assert value(synced, "modelmux_modelsync_sync_errors_total", source=source_id) == 0
    last = "modelmux_modelsync_last_success_timestamp_seconds"
    assert value(synced, last, source=source_id) >= value(sync_before, last, source=source_id) > 0

    served = scrape(metrics_port(backend))
    assert value(served, "modelmux_embedded_model_versions", state="AVAILABLE") == 2
    assert value(served, "modelmux_embedded_requests_total", method="Predict", code="OK") >= 5
    assert value(served, "modelmux_embedded_load_duration_seconds_count", outcome="loaded") == 2


async def test_two_workers_report_their_sum_on_one_endpoint(
    tmp_path: Path, example_models: Path, backend: Proc
) -> None:
    config = write_config(
        tmp_path / "modelmux.yaml",
        models=example_models,
        backends=[{"name": "cpu-0", "address": backend.address}],
        gateway={"metrics_listen": "127.0.0.1:0", "status_interval": "200ms"},
    )
    gateway = start_daemon(["gateway", "--config", str(config), "--workers", "2"])
    try:
        wait_serving(gateway.address)
        port = metrics_port(gateway)  # the supervisor's: the workers serve none of their own
        await wait_for(
            lambda: sum(e.get("event") == "serving" for e in gateway.lines) == 2,
            timeout=60,
            what="both workers serving",
        )
        answered = 0
        for _ in range(40):  # a new connection each time: the kernel spreads them over workers
            with grpc.insecure_channel(gateway.address) as channel:
                answered += predict(channel, "half_plus_two", 1) == OK

        def per_worker() -> collections.Counter[object]:
            return collections.Counter(
                e.get("worker")
                for e in gateway.lines
                if e.get("event") == "request" and e.get("status") == "OK"
            )

        await wait_for(lambda: sum(per_worker().values()) == answered, timeout=10, what="logs")
        assert answered >= 38 and len(per_worker()) == 2, per_worker()
        samples = scrape(port)
        ok = {**FACADE, "model": "half_plus_two", "version": "1", "code": "OK"}
        assert value(samples, "modelmux_requests_total", **ok) == answered
        served = {**FACADE, "model": "half_plus_two"}
        assert value(samples, "modelmux_request_duration_seconds_count", **served) >= answered
        await wait_for(
            lambda: (
                value(scrape(port), "modelmux_inflight_calls", limit="gateway.max_inflight") == 0
            ),
            timeout=5,
            what="nothing in flight over both workers",
        )
    finally:
        assert gateway.stop() == 0


@pytest.mark.parametrize(
    ("daemon", "key"),
    [
        ("gateway", "gateway.metrics_listen"),
        ("gateway --workers 2", "gateway.metrics_listen"),
        ("sync", "modelsync.metrics_listen"),
        ("backend --name cpu-0", "backends[].metrics_listen"),
    ],
)
def test_a_busy_metrics_address_stops_the_daemon_with_its_name(
    tmp_path: Path, example_models: Path, daemon: str, key: str
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        address = f"127.0.0.1:{holder.getsockname()[1]}"
        config = tmp_path / "modelmux.yaml"
        section, _, name = key.partition(".")
        doc: dict[str, Any] = {
            "gateway": {"listen": "127.0.0.1:0"},
            "modelsync": {"listen": "127.0.0.1:0", "target": str(tmp_path / "volume")},
            "backends": [{"name": "cpu-0", "address": f"127.0.0.1:{free_port()}"}],
            "apis": [
                {
                    "name": "hpt",
                    "handler": {"models": {"path": str(example_models / "half_plus_two")}},
                }
            ],
        }
        if section == "backends[]":
            doc["backends"][0][name] = address
        else:
            doc[section][name] = address
        config.write_text(yaml.safe_dump(doc))
        command, *flags = daemon.split()
        done = subprocess.run(
            [*MODELMUX, command, "--config", str(config), *flags],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
    assert done.returncode == 1, done.stderr[-3000:]
    assert f"{key}: cannot listen on {address}: the address is in use by pid" in done.stderr
