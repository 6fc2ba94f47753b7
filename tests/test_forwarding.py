"""When the forwarder pins a call to the version routing chose, and when it sends the caller's bytes.

A call for latest goes out unchanged when the chosen backend's own latest is the routed version
(no copy of a large request); labels, a split's pick of a lower version, newer versions still
loading or about to be unloaded, and backends this process does not configure get the pin.
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.calls import Call, Forwarder
from gateway.catalog import DesiredModel, Servable
from gateway.pool import AVAILABLE, Backend, VersionState, VersionStatus
from gateway.pool import Pool as PoolImpl
from gateway.routing import Route, Table, Target
from modelmux_common.config import BackendConfig, GatewayConfig
from modelmux_common.tfserving import predict_pb2


class Context:
    def time_remaining(self) -> None:
        return None

    def invocation_metadata(self) -> tuple[()]:
        return ()


class Pool:
    def __init__(self, table: Table) -> None:
        self.table = table


def _request(version: int | None = None, label: str = "") -> bytes:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    if version is not None:
        request.model_spec.version.value = version
    if label:
        request.model_spec.version_label = label
    request.inputs["x"].float_val.append(1.0)
    return request.SerializeToString()


async def _sent(
    top: bool, *, version: int | None = None, label: str | None = None, split: bool = False
) -> bytes:
    backend = Backend(BackendConfig("b", "127.0.0.1:1"), GatewayConfig())
    seen: list[bytes] = []

    async def predict(data: bytes, timeout: float | None = None) -> bytes:
        seen.append(data)
        return b""

    backend.calls["Predict"] = predict  # type: ignore[assignment]
    versions = {1: (Target(backend, "m", False),), 2: (Target(backend, "m", top),)}
    route = Route("m", versions, {"stable": 2}, {1: 1} if split else {})
    forwarder = Forwarder(
        Pool(Table({"m": route}, frozenset({"m"}))),  # type: ignore[arg-type]
        timeout=5.0,
        max_inflight=10,
        backend_max_inflight=10,
    )
    context: Any = Context()
    data = _request(version, label or "")
    await forwarder.send(
        "Predict", data, model="m", version=version, label=label, context=context,
        call=Call(context),
    )  # fmt: skip
    await backend.channel.close()
    assert seen[0].startswith(data)
    return seen[0]


def _spec(sent: bytes) -> tuple[int, str]:
    spec = predict_pb2.PredictRequest.FromString(sent).model_spec
    return spec.version.value, spec.version_label


async def test_latest_goes_out_unchanged_when_the_backends_latest_is_the_routed_version() -> None:
    assert await _sent(top=True) == _request()


@pytest.mark.parametrize(
    ("top", "version", "label", "split", "pinned"),
    [
        (False, None, None, False, 2),  # a newer version on the backend or in the catalogue
        (True, None, "stable", False, 2),  # the backend knows no gateway label
        (True, None, None, True, 1),  # the split sent this call to version 1
    ],
)
async def test_pinned_to_the_routed_version(
    top: bool, version: int | None, label: str | None, split: bool, pinned: int
) -> None:
    sent = await _sent(top, version=version, label=label, split=split)
    assert sent != _request(version, label or "")
    assert _spec(sent)[0] == pinned


async def test_an_explicit_version_goes_out_unchanged() -> None:
    assert await _sent(top=False, version=2) == _request(2)


@pytest.mark.parametrize(
    ("catalogue", "reported", "managed", "pushed", "tops"),
    [
        ((1, 2), {1: "A", 2: "A"}, True, True, {1: False, 2: True}),
        ((1, 2, 3), {1: "A", 2: "A"}, True, True, {1: False, 2: False}),  # 3 is coming: pinned
        ((1, 2), {1: "A", 2: "A", 3: "L"}, True, True, {1: False, 2: False}),  # 3 loading there
        ((1, 2), {1: "A", 2: "A", 3: "E"}, True, True, {1: False, 2: True}),  # 3 unloaded (END)
        ((1, 2), {1: "A", 2: "A"}, False, True, {1: False, 2: False}),  # another worker configures
        ((1, 2), {1: "A", 2: "A"}, True, False, {1: False, 2: False}),  # restarted: push pending
    ],
)
async def test_routing_marks_the_backends_own_latest(
    catalogue: tuple[int, ...],
    reported: dict[int, str],
    managed: bool,
    pushed: bool,
    tops: dict[int, bool],
) -> None:
    states = {"A": AVAILABLE, "L": VersionState.LOADING, "E": VersionState.END}
    servable = Servable("m", "/models/m", catalogue)
    model = DesiredModel("m", "api", False, {v: "m" for v in catalogue}, {"m": servable})
    pool = PoolImpl(
        config=GatewayConfig(),
        backends=[BackendConfig("b", "127.0.0.1:1")],
        models={"m": model},
        labels={},
        manage=managed,
    )
    backend = pool.backends[0]
    backend.status = backend.reported = {
        "m": {v: VersionStatus(states[s]) for v, s in reported.items()}
    }
    backend.pushed = object() if pushed else None
    pool._rebuild()
    route = pool.table.routes["m"]
    assert {v: targets[0].top for v, targets in route.versions.items()} == tops
    await backend.channel.close()


async def test_a_version_about_to_be_unloaded_keeps_latest_pinned() -> None:
    """Removing the highest version: routing leaves it before the push, but the backend serves it
    as its latest until a poll after the push shows it gone."""
    servable = Servable("m", "/models/m", (1, 2))
    model = DesiredModel("m", "api", False, {1: "m", 2: "m"}, {"m": servable})
    pool = PoolImpl(
        config=GatewayConfig(), backends=[BackendConfig("b", "127.0.0.1:1")],
        models={"m": model}, labels={},
    )  # fmt: skip
    backend = pool.backends[0]
    backend.pushed = object()
    backend.status = backend.reported = {
        "m": {v: VersionStatus(AVAILABLE) for v in (1, 2, 3)}
    }  # version 3 was just removed from the catalogue
    pool._forget_unwanted(backend, [servable])
    route = pool.table.routes["m"]
    assert set(route.versions) == {1, 2}  # routing left version 3 ...
    assert not route.versions[2][0].top  # ... but a call for latest stays pinned to 2
    await backend.channel.close()
