"""The table builder, case by case: desired state + what the backends report -> routing table.

Pure: no backend, no event loop, the time passed in. Each case names the desired models, the
backends' reports and what the table must say (routes, the backends' own latest, labels, states
and their reasons)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import pytest

from gateway.catalog import DesiredModel, Expected, Problems, Servable, single_servable
from gateway.fleet.desired import Desired, wanted, with_models
from gateway.fleet.report import Report
from gateway.fleet.table import build
from gateway.routing import Endpoint
from gateway.transport import MemoryTransport, VersionState, VersionStatus
from modelmux_common.config import BackendConfig

STATE = {
    "A": VersionState.AVAILABLE,
    "L": VersionState.LOADING,
    "U": VersionState.UNLOADING,
    "E": VersionState.END,
}
NOW = 1000.0


def report(
    name: str = "b",
    status: Mapping[str, Mapping[int, str]] | None = None,
    *,
    accelerator: Literal["cpu", "gpu", "inferentia"] = "cpu",
    reachable: bool = True,
    pushed: bool = True,
    error: str = "",
    load_errors: Mapping[tuple[str, int], str] | None = None,
    since: float = 0.0,
    reported: Mapping[str, Mapping[int, str]] | None = None,
    retry_at: Mapping[tuple[str, int], float] | None = None,
) -> Report:
    def statuses(given: Mapping[str, Mapping[int, str]]) -> dict[str, dict[int, VersionStatus]]:
        return {s: {v: VersionStatus(STATE[x]) for v, x in vs.items()} for s, vs in given.items()}

    status = status or {}
    available = {(s, v) for s, vs in status.items() for v, x in vs.items() if x == "A"}
    return Report(
        config=BackendConfig(name, f"{name}.test:8500", accelerator=accelerator),
        endpoint=Endpoint(name, f"{name}.test:8500", MemoryTransport()),
        reachable=reachable,
        last_error=error,
        status=statuses(status),
        reported=statuses(status if reported is None else reported),
        pushed=pushed,
        load_errors=dict(load_errors or {}),
        available_since=dict.fromkeys(available, since),
        retry_at=dict(retry_at or {}),
    )


def model(
    versions: tuple[int, ...] = (1, 2),
    *,
    name: str = "m",
    inferentia: bool = False,
    gpu_only: bool = False,
    servables: Mapping[int, str] | None = None,
) -> DesiredModel:
    if servables is None:
        return single_servable(name, "api", inferentia, f"/v/{name}", versions, gpu_only)
    return DesiredModel(
        name,
        "api",
        inferentia,
        dict(servables),
        {s: Servable(s, f"/s/{s}", (v,)) for v, s in servables.items()},
        gpu_only,
    )


def desired(*models: DesiredModel, backends: tuple[Report, ...] = (), **more: Any) -> Desired:
    return Desired(
        models={m.name: m for m in models},
        backend_configs=tuple(r.config for r in backends),
        **more,
    )


@dataclass
class Case:
    desired: Desired
    reports: tuple[Report, ...]
    # version -> backend/servable (None: not checked)
    routes: Mapping[int, list[str]] | None = field(default_factory=dict)
    state: str = "AVAILABLE"
    reason: str = ""  # a part of the state's reason
    tops: Mapping[int, bool] | None = None
    labels: Mapping[str, int] | None = None
    effective: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    failed: Mapping[int, str] = field(default_factory=dict)


def _case(**kwargs: Any) -> Case:
    if "routes" not in kwargs and ("tops" in kwargs or "labels" in kwargs):
        kwargs["routes"] = None
    reports = kwargs.pop("reports", (report("b", {"m": {1: "A", 2: "A"}}),))
    want = kwargs.pop("desired", None) or desired(model(), backends=reports)
    return Case(desired=want, reports=reports, **kwargs)


B_DOWN = report("b", reachable=False, error="UNAVAILABLE: connection refused", pushed=False)
CASES = {
    "two versions on one backend": _case(routes={1: ["b/m"], 2: ["b/m"]}, tops={1: False, 2: True}),
    "a version still loading is not routed": _case(
        reports=(report("b", {"m": {1: "A", 2: "L"}}),), routes={1: ["b/m"]}
    ),
    "two backends, one without version 2 yet": _case(
        reports=(report("a", {"m": {1: "A", 2: "A"}}), report("b", {"m": {1: "A", 2: "L"}})),
        routes={1: ["a/m", "b/m"], 2: ["a/m"]},
    ),
    "nothing loaded yet": _case(
        reports=(report("b", {"m": {1: "L", 2: "L"}}),),
        state="LOADING",
        reason="versions 1, 2 loading on b",
    ),
    "the only backend is down": _case(
        reports=(B_DOWN,),
        state="LOADING",
        reason="no backend that can hold it is reachable: b (UNAVAILABLE: connection refused)",
    ),
    "a backend never reached yet": _case(
        reports=(replace(B_DOWN, last_error=""),),
        state="LOADING",
        reason="b (not reached yet)",
    ),
    "no backend discovered yet": _case(
        desired=desired(model(), backends=(report("pods"),)),
        reports=(),
        state="LOADING",
        reason="waiting for its backends to be discovered",
    ),
    "failed to load on every reachable backend": _case(
        reports=(
            report("a", {"m": {1: "E", 2: "E"}}, load_errors={("m", 1): "bad", ("m", 2): "bad"}),
            replace(B_DOWN, config=BackendConfig("z", "z.test:1")),
        ),
        state="FAILED",
        reason="version 2 failed to load on a: bad",
        failed={1: "version 1 failed to load on a: bad", 2: "version 2 failed to load on a: bad"},
    ),
    "failed on one backend, loading on another": _case(
        reports=(
            report("a", {"m": {2: "E"}}, load_errors={("m", 2): "bad"}),
            report("b", {"m": {1: "A", 2: "L"}}),
        ),
        routes={1: ["b/m"]},
    ),
    "one version failed, the other serves": _case(
        reports=(report("b", {"m": {1: "A", 2: "E"}}, load_errors={("m", 2): "bad"}),),
        routes={1: ["b/m"]},
        failed={2: "version 2 failed to load on b: bad"},
    ),
    "inferentia model, CPU backends only": _case(
        desired=desired(model(inferentia=True), backends=(report("b"),)),
        reports=(report("b"),),
        state="FAILED",
        reason="runs on Inferentia (compute.inf > 0) and no backend has accelerator: inferentia",
    ),
    "inferentia model on an inferentia backend only": _case(
        desired=desired(
            model(inferentia=True),
            backends=(report("b"), report("n", accelerator="inferentia")),
        ),
        reports=(report("b"), report("n", {"m": {1: "A", 2: "A"}}, accelerator="inferentia")),
        routes={1: ["n/m"], 2: ["n/m"]},
    ),
    "GPU model, CPU backends only": _case(
        desired=desired(model(gpu_only=True), backends=(report("b"),)),
        reports=(report("b"),),
        state="FAILED",
        reason="asks for GPUs (compute.gpu > 0) and no backend has accelerator: gpu",
    ),
    "CPU model on GPU and CPU backends, not on inferentia": _case(
        desired=desired(
            model(),
            backends=(report("g", accelerator="gpu"), report("n", accelerator="inferentia")),
        ),
        reports=(
            report("g", {"m": {1: "L"}}, accelerator="gpu"),
            report("n", {"m": {1: "L"}}, accelerator="inferentia"),
        ),
        routes={},
        state="LOADING",
        reason="versions 1, 2 loading on g",  # the inferentia backend is not named
    ),
    "refused by modelsync": _case(
        desired=desired(
            problems=Problems(refused={"m": {None: "no saved_model.pb"}}, apis={"m": "api"})
        ),
        reports=(),
        state="REFUSED",
        reason="modelsync refused it: no saved_model.pb",
    ),
    "a refused version beside a published one": _case(
        desired=desired(
            model((1,)),
            backends=(report("b"),),
            problems=Problems(refused={"m": {2: "no variables/"}}),
        ),
        reports=(report("b", {"m": {1: "A"}}),),
        routes={1: ["b/m"]},
        failed={2: "modelsync refused version 2: no variables/"},
    ),
    "expected, its source failing": _case(
        desired=desired(
            expected={"m": Expected("api", "s3://bucket/m/")},
            problems=Problems(source_errors={("api", "s3://bucket/m/"): "AccessDenied"}),
        ),
        reports=(),
        state="SOURCE_FAILING",
        reason="its source s3://bucket/m/ fails: AccessDenied",
    ),
    "expected, nothing published yet": _case(
        desired=desired(expected={"m": Expected("api", "/models/m")}),
        reports=(),
        state="PENDING",
        reason="modelsync has published no version of it yet",
    ),
    # the backend's own latest ("top"): a call for latest needs no pin to it
    "a newer version in the catalogue: latest pinned": _case(
        desired=desired(model((1, 2, 3)), backends=(report("b"),)),
        routes={1: ["b/m"], 2: ["b/m"]},
        tops={1: False, 2: False},
    ),
    "a newer version loading on the backend: latest pinned": _case(
        reports=(report("b", {"m": {1: "A", 2: "A", 3: "L"}}),), tops={1: False, 2: False}
    ),
    "a newer version unloaded (END): not in the way": _case(
        reports=(report("b", {"m": {1: "A", 2: "A", 3: "E"}}),), tops={1: False, 2: True}
    ),
    "another worker configures the backend: latest pinned": _case(
        desired=desired(model(), backends=(report("b"),), manage=False), tops={1: False, 2: False}
    ),
    "restarted, push pending: latest pinned": _case(
        reports=(report("b", {"m": {1: "A", 2: "A"}}, pushed=False),), tops={1: False, 2: False}
    ),
    "a version about to be unloaded keeps latest pinned": _case(
        # routing left version 3 ahead of the push, the backend still serves it as its latest
        reports=(report("b", {"m": {1: "A", 2: "A"}}, reported={"m": {1: "A", 2: "A", 3: "A"}}),),
        routes={1: ["b/m"], 2: ["b/m"]},
        tops={1: False, 2: False},
    ),
    # labels
    "a new label points at once": _case(
        desired=desired(model(), backends=(report("b"),), labels={"m": {"stable": 1}}),
        labels={"stable": 1},
    ),
    "a label moves once its version is on every reachable backend": _case(
        desired=desired(model(), backends=(report("b"),), labels={"m": {"stable": 2}}),
        reports=(report("a", {"m": {1: "A", 2: "A"}}), report("b", {"m": {1: "A", 2: "A"}})),
        effective={"m": {"stable": 1}},
        labels={"stable": 2},
    ),
    "a label waits while a backend still loads its version": _case(
        desired=desired(model(), backends=(report("b"),), labels={"m": {"stable": 2}}),
        reports=(report("a", {"m": {1: "A", 2: "A"}}), report("b", {"m": {1: "A", 2: "L"}})),
        effective={"m": {"stable": 1}},
        labels={"stable": 1},
    ),
    "a label ignores an unreachable backend": _case(
        desired=desired(model(), backends=(report("b"),), labels={"m": {"stable": 2}}),
        reports=(report("a", {"m": {1: "A", 2: "A"}}), B_DOWN),
        effective={"m": {"stable": 1}},
        labels={"stable": 2},
    ),
    "a deleted label goes": _case(effective={"m": {"stable": 1}}, labels={}),
    # content swaps: version 1's content replaced, m@r7 -> m@r9
    "swap: the old content serves while the new one loads": _case(
        desired=desired(
            model(servables={1: "m@r9"}),
            backends=(report("b"),),
            previous={("m", 1): Servable("m@r7", "/s/m@r7", (1,))},
        ),
        reports=(report("b", {"m@r7": {1: "A"}, "m@r9": {1: "L"}}),),
        routes={1: ["b/m@r7"]},
    ),
    "swap: the new content serves once AVAILABLE": _case(
        desired=desired(
            model(servables={1: "m@r9"}),
            backends=(report("b"),),
            previous={("m", 1): Servable("m@r7", "/s/m@r7", (1,))},
        ),
        reports=(report("b", {"m@r7": {1: "A"}, "m@r9": {1: "A"}}),),
        routes={1: ["b/m@r9"]},
    ),
    "swap on two backends: each serves what it holds": _case(
        desired=desired(
            model(servables={1: "m@r9"}),
            backends=(report("a"), report("b")),
            previous={("m", 1): Servable("m@r7", "/s/m@r7", (1,))},
        ),
        reports=(
            report("a", {"m@r7": {1: "A"}, "m@r9": {1: "A"}}),
            report("b", {"m@r7": {1: "A"}, "m@r9": {1: "L"}}),
        ),
        routes={1: ["a/m@r9", "b/m@r7"]},
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_table(case: Case) -> None:
    built = build(case.desired, case.reports, case.effective, NOW)
    table = built.table
    route = table.routes.get("m")
    got = (
        {
            v: [f"{t.backend.name}/{t.servable}" for t in targets]
            for v, targets in route.versions.items()
        }
        if route
        else {}
    )
    if case.routes is not None:
        assert got == case.routes
    status = table.states["m"]
    assert status.state == case.state and case.reason in status.reason, status
    if case.tops is not None:
        assert route is not None
        assert {v: ts[0].top for v, ts in route.versions.items()} == case.tops
    if case.labels is not None:
        assert route is not None and dict(route.labels) == case.labels
    assert {v: why for (m, v), why in table.failed_versions.items() if m == "m"} == case.failed


def test_a_route_carries_its_api_and_split() -> None:
    want = desired(model(), backends=(report("b"),), splits={"m": {1: 3, 2: 1}})
    route = build(want, (report("b", {"m": {1: "A", 2: "A"}}),), {}, NOW).table.routes["m"]
    assert route.api == "api" and dict(route.split) == {1: 3, 2: 1}


def test_a_moved_label_is_reported_once() -> None:
    want = desired(model(), backends=(report("b"),), labels={"m": {"stable": 2}})
    reports = (report("b", {"m": {1: "A", 2: "A"}}),)
    first = build(want, reports, {"m": {"stable": 1}}, NOW)
    assert first.moves == (("m", "stable", 2),)
    assert build(want, reports, first.effective, NOW).moves == ()


@pytest.mark.parametrize(
    ("hold", "since", "forgotten"),
    [
        (0.0, NOW, True),  # one worker: forgotten as soon as every backend has the new content
        (5.0, NOW - 1, False),  # several workers: kept until the new content settled ...
        (5.0, NOW - 5, True),  # ... for the hold
    ],
)
def test_the_old_content_is_forgotten_once_settled(
    hold: float, since: float, forgotten: bool
) -> None:
    old = Servable("m@r7", "/s/m@r7", (1,))
    want = desired(
        model(servables={1: "m@r9"}), backends=(report("b"),), previous={("m", 1): old}, hold=hold
    )
    reports = (report("b", {"m@r7": {1: "A"}, "m@r9": {1: "A"}}, since=since),)
    assert (("m", 1) not in build(want, reports, {}, NOW).previous) == forgotten
    kept = {s.name for s in wanted(want, reports[0], NOW)}
    assert ("m@r7" in kept) != forgotten


def test_a_second_rewrite_keeps_the_content_that_serves() -> None:
    """Version 1 serves from m; it is rewritten (m@r7, still loading), then again (m@r9):
    routing keeps using m until a successor is AVAILABLE."""
    start = desired(model((1,)), backends=(report("b"),))
    serving = report("b", {"m": {1: "A"}})
    step = with_models(start, {"m": model(servables={1: "m@r7"})}, (serving,), NOW)
    loading = report("b", {"m": {1: "A"}, "m@r7": {1: "L"}})
    step = with_models(step, {"m": model(servables={1: "m@r9"})}, (loading,), NOW)
    assert step.previous[("m", 1)].name == "m"
    routes = build(step, (loading,), {}, NOW).table.routes["m"].versions
    assert [t.servable for t in routes[1]] == ["m"]
    assert "m" in {s.name for s in wanted(step, loading, NOW)}
    done = report("b", {"m": {1: "A"}, "m@r9": {1: "A"}})
    assert [t.servable for t in build(step, (done,), {}, NOW).table.routes["m"].versions[1]] == [
        "m@r9"
    ]


def test_with_several_workers_a_removed_version_stays_loaded_for_the_hold() -> None:
    start = desired(model((1, 2)), backends=(report("b"),), hold=2.0)
    serving = report("b", {"m": {1: "A", 2: "A"}})
    step = with_models(start, {"m": model((1,))}, (serving,), NOW)
    assert 2 not in build(step, (serving,), {}, NOW).table.routes["m"].versions  # left at once
    assert [(s.name, s.versions) for s in wanted(step, serving, NOW)] == [("m", (1, 2))]
    assert [(s.name, s.versions) for s in wanted(step, serving, NOW + 2.0)] == [("m", (1,))]


def test_a_failed_version_is_left_out_until_its_retry_is_due() -> None:
    want = desired(model((1, 2)), backends=(report("b"),))
    failed = report("b", {"m": {1: "A", 2: "E"}}, retry_at={("m", 2): NOW + 4})
    assert [s.versions for s in wanted(want, failed, NOW)] == [(1,)]
    assert [s.versions for s in wanted(want, failed, NOW + 4)] == [(1, 2)]
