"""A backend's reconciler against an in-memory backend: what it pushes, when it pushes again,
and what it reports (to the fleet's table) when loads fail or the backend goes away."""

from __future__ import annotations

from typing import Any

import grpc

from gateway.catalog import DesiredModel, Servable, single_servable
from gateway.fleet.fleet import Fleet
from gateway.transport import (
    AVAILABLE,
    END,
    MemoryTransport,
    VersionState,
    VersionStatus,
    rpc_error,
)
from modelmux_common.config import BackendConfig, GatewayConfig

LOADING = VersionState.LOADING


def _fleet(
    transport: MemoryTransport,
    *,
    manage: bool = True,
    models: dict[str, DesiredModel] | None = None,
) -> Fleet:
    return Fleet(
        config=GatewayConfig(),
        backends=[BackendConfig("b", "b.test:8500")],
        models=models or {"m": single_servable("m", "api", False, "/models/m", (1, 2), False)},
        labels={},
        manage=manage,
        transport=lambda _: transport,
    )


def _pushed(config: Any) -> dict[str, tuple[int, ...]]:
    return {
        entry.name: tuple(entry.model_version_policy.specific.versions)
        for entry in config.model_config_list.config
    }


def _available(*versions: int) -> dict[int, VersionStatus]:
    return {v: VersionStatus(AVAILABLE) for v in versions}


async def test_the_whole_config_is_pushed_once_then_only_polled() -> None:
    transport = MemoryTransport(statuses={"m": _available(1, 2)})
    fleet = _fleet(transport)
    reconciler = fleet.reconcilers[0]
    assert await reconciler.round()  # converged
    assert [_pushed(c) for c in transport.configs] == [{"m": (1, 2)}]
    assert set(fleet.table.routes["m"].versions) == {1, 2}
    assert await reconciler.round()
    assert len(transport.configs) == 1  # nothing changed: nothing pushed


async def test_a_version_that_failed_to_load_is_left_out_of_the_next_push() -> None:
    transport = MemoryTransport(
        statuses={"m": {1: VersionStatus(AVAILABLE), 2: VersionStatus(END, "bad graph")}}
    )
    fleet = _fleet(transport)
    reconciler = fleet.reconcilers[0]
    assert not await reconciler.round()  # the config must change: not converged
    report = reconciler.report()
    assert report.load_errors == {("m", 2): "bad graph"} and ("m", 2) in report.retry_at
    await reconciler.round()
    assert [_pushed(c) for c in transport.configs] == [{"m": (1, 2)}, {"m": (1,)}]
    assert set(fleet.table.routes["m"].versions) == {1}
    assert fleet.table.failed_versions[("m", 2)] == "version 2 failed to load on b: bad graph"


async def test_a_backend_that_lost_its_config_gets_it_again() -> None:
    transport = MemoryTransport(statuses={"m": _available(1, 2)})
    fleet = _fleet(transport)
    reconciler = fleet.reconcilers[0]
    await reconciler.round()
    assert fleet.table.routes["m"].versions[2][0].top  # the backend's own latest
    transport.statuses.clear()  # restarted: it knows no servable
    assert not await reconciler.round()
    assert not reconciler.report().pushed
    assert not fleet.table.routes["m"].versions[2][0].top  # calls for latest pinned meanwhile
    transport.statuses["m"] = _available(1, 2)
    assert await reconciler.round()
    assert len(transport.configs) == 2


async def test_an_unreachable_backend_leaves_routing_and_says_why() -> None:
    transport = MemoryTransport(statuses={"m": _available(1, 2)})
    fleet = _fleet(transport)
    reconciler = fleet.reconcilers[0]
    await reconciler.step()
    transport.down = rpc_error(grpc.StatusCode.UNAVAILABLE, "connection refused")
    wait, backoff = await reconciler.step(0.1)
    assert (wait, backoff) == (0.1, 0.2)
    report = reconciler.report()
    assert not report.reachable and report.last_error == "UNAVAILABLE: connection refused"
    assert "m" not in fleet.table.routes
    assert "b (UNAVAILABLE: connection refused)" in fleet.table.states["m"].reason
    transport.down = None
    await reconciler.step()
    assert len(transport.configs) == 2  # pushed again: it may have restarted meanwhile
    assert set(fleet.table.routes["m"].versions) == {1, 2}


async def test_a_worker_that_does_not_manage_the_backend_only_polls() -> None:
    transport = MemoryTransport(statuses={"m": _available(1, 2)})
    fleet = _fleet(transport, manage=False)
    assert await fleet.reconcilers[0].round()
    assert transport.configs == [] and set(fleet.table.routes["m"].versions) == {1, 2}


def _content(revision: int) -> DesiredModel:
    name = f"m@r{revision}"
    return DesiredModel("m", "api", False, {1: name}, {name: Servable(name, f"/s/{name}", (1,))})


async def test_a_content_swap_keeps_the_old_servable_until_the_new_one_serves() -> None:
    transport = MemoryTransport(statuses={"m@r7": _available(1)})
    fleet = _fleet(transport, models={"m": _content(7)})
    reconciler = fleet.reconcilers[0]
    await reconciler.round()
    fleet.update({"m": _content(9)})
    transport.statuses["m@r9"] = {1: VersionStatus(LOADING)}
    await reconciler.round()
    assert _pushed(transport.configs[-1]) == {"m@r9": (1,), "m@r7": (1,)}  # both loaded
    assert [t.servable for t in fleet.table.routes["m"].versions[1]] == ["m@r7"]
    transport.statuses["m@r9"] = _available(1)
    await reconciler.round()
    assert [t.servable for t in fleet.table.routes["m"].versions[1]] == ["m@r9"]
    await reconciler.round()
    assert _pushed(transport.configs[-1]) == {"m@r9": (1,)}  # the old content unloaded
    assert fleet.desired.previous == {}
