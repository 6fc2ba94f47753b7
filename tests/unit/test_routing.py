"""How a request picks a version and a backend (gateway/routing.py): explicit versions, labels,
latest and its traffic split, the status of what cannot be served, power-of-two choices; and which
backends a model is placed on (gateway/catalog.py)."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.catalog import single_servable
from gateway.errors import GatewayError
from gateway.forwarding import pick
from gateway.routing import FAILED, LOADING, REFUSED, ModelStatus, Route, Table, Target
from modelmux_common.config import BackendConfig


@dataclass
class FakeBackend:
    name: str
    outstanding: int = 0


A, B, C = FakeBackend("a"), FakeBackend("b"), FakeBackend("c")


def route(
    versions: Mapping[int, Sequence[FakeBackend]],
    labels: Mapping[str, int] | None = None,
    split: Mapping[int, int] | None = None,
) -> Route:
    return Route(
        model="m",
        versions={v: [Target(b, "m") for b in bs] for v, bs in versions.items()},
        labels=labels or {},
        split=split or {},
    )


def table(r: Route, *, known: frozenset[str] = frozenset(), **extra: Any) -> Table:
    return Table(routes={"m": r}, known=known | {"m"}, **extra)


def refused(
    t: Table, model: str, version: int | None, label: str | None
) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(GatewayError) as info:
        t.resolve(model, version, label)
    return info.value.code, info.value.message


def name(target: Target | None) -> str:
    assert target is not None
    return target.backend.name


def backends(targets: Sequence[Target]) -> list[str]:
    return [t.backend.name for t in targets]


# --- versions and labels ----------------------------------------------------------------------


def test_an_explicit_version_and_latest() -> None:
    t = table(route({1: [A], 2: [A, B]}))
    assert (t.resolve("m", 1, None)[0], backends(t.resolve("m", 1, None)[1])) == (1, ["a"])
    for latest in (None, 0):  # absent and 0 both mean latest
        version, targets = t.resolve("m", latest, None)
        assert version == 2 and backends(targets) == ["a", "b"]


def test_a_label_wins_over_a_version() -> None:
    t = table(route({1: [A], 2: [B]}, labels={"stable": 1, "canary": 2}))
    assert t.resolve("m", None, "stable")[0] == 1
    assert t.resolve("m", 2, "stable")[0] == 1
    assert t.resolve("m", 1, "canary")[0] == 2
    assert t.resolve("m", 1, "")[0] == 1  # an empty label is no label


def test_unknown_labels_and_versions_are_not_found_naming_what_there_is() -> None:
    t = table(route({1: [A], 3: [A]}, labels={"stable": 1}))
    code, message = refused(t, "m", None, "beta")
    assert code is grpc.StatusCode.NOT_FOUND and "'beta'" in message and "labels: stable" in message
    code, message = refused(t, "m", 2, None)
    assert code is grpc.StatusCode.NOT_FOUND and "available versions: 1, 3" in message


def test_a_label_on_a_version_that_is_gone() -> None:
    t = table(route({1: [A]}, labels={"old": 7}))
    code, message = refused(t, "m", None, "old")
    assert code is grpc.StatusCode.NOT_FOUND
    assert "label 'old' points at version 7, which is not available" in message


def test_an_unknown_model_lists_the_models_served() -> None:
    t = table(route({1: [A]}), known=frozenset({"n"}))
    code, message = refused(t, "x" * 500, None, None)
    assert code is grpc.StatusCode.NOT_FOUND and "(models: m, n)" in message
    assert "(500 characters)" in message  # the caller's name is cut, not echoed whole
    code, message = refused(Table(), "x", None, None)
    assert "(models: none)" in message


# --- what cannot be served, and why -----------------------------------------------------------


def test_a_version_configured_but_not_loaded_is_unavailable() -> None:
    t = table(route({1: [A]}), configured={"m": frozenset({1, 2})})
    code, message = refused(t, "m", 2, None)
    assert code is grpc.StatusCode.UNAVAILABLE and "not loaded on any reachable backend" in message


def test_a_version_that_failed_is_failed_precondition_with_its_reason() -> None:
    t = table(
        route({1: [A]}, labels={"next": 2}),
        configured={"m": frozenset({1, 2})},
        failed_versions={("m", 2): "refused by modelsync: no saved_model.pb"},
    )
    for version, label in ((2, None), (None, "next")):
        code, message = refused(t, "m", version, label)
        assert code is grpc.StatusCode.FAILED_PRECONDITION and "no saved_model.pb" in message


@pytest.mark.parametrize(
    ("state", "code"),
    [
        (REFUSED, grpc.StatusCode.FAILED_PRECONDITION),
        (FAILED, grpc.StatusCode.FAILED_PRECONDITION),
        (LOADING, grpc.StatusCode.UNAVAILABLE),
    ],
)
def test_a_model_without_a_routable_version_answers_by_its_state(
    state: str, code: grpc.StatusCode
) -> None:
    t = Table(known=frozenset({"m"}), states={"m": ModelStatus(state, "the reason")})
    got, message = refused(t, "m", None, None)
    assert got is code and "the reason" in message
    got, _ = refused(Table(known=frozenset({"m"})), "m", None, None)
    assert got is grpc.StatusCode.UNAVAILABLE  # known, nothing reported yet


# --- latest with a traffic split --------------------------------------------------------------


def test_a_split_weights_latest_and_skips_what_is_not_routable() -> None:
    random.seed(7)
    r = route({1: [A], 2: [B]}, split={1: 3, 2: 1, 5: 100})  # 5 is not routable
    picked = [r.pick_latest() for _ in range(4000)]
    assert set(picked) == {1, 2}
    assert 0.70 < picked.count(1) / len(picked) < 0.80
    assert table(r).resolve("m", 2, None)[0] == 2  # an explicit version ignores the split


def test_a_split_of_nothing_routable_falls_back_to_the_highest() -> None:
    assert route({1: [A], 2: [B]}, split={9: 1, 1: 0}).pick_latest() == 2
    assert route({}).latest == 0


# --- picking a backend ------------------------------------------------------------------------


def test_pick_prefers_the_less_busy_of_two() -> None:
    busy, idle = FakeBackend("busy", outstanding=5), FakeBackend("idle")
    targets = [Target(busy, "m"), Target(idle, "m")]
    assert {name(pick(targets)) for _ in range(50)} == {"idle"}


def test_pick_excludes_the_backend_that_failed() -> None:
    targets = [Target(A, "m"), Target(B, "m@r2")]
    for _ in range(20):
        chosen = pick(targets, exclude=Target(A, "m"))
        assert chosen is not None and chosen.backend is B
    assert pick([Target(A, "m")], exclude=Target(A, "other")) is None  # by backend, not servable
    assert pick([]) is None


def test_pick_spreads_over_equally_busy_backends() -> None:
    random.seed(3)
    targets = [Target(b, "m") for b in (A, B, C)]
    assert {name(pick(targets)) for _ in range(200)} == {"a", "b", "c"}


# --- placement --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inferentia", "gpu_only", "placed"),
    [(False, False, {"cpu", "gpu"}), (False, True, {"gpu"}), (True, False, {"inferentia"})],
)
def test_placement_by_accelerator(inferentia: bool, gpu_only: bool, placed: set[str]) -> None:
    model = single_servable("m", "api", inferentia, "/v/m", (1,), gpu_only)
    configs = {
        a: BackendConfig(name=a, address="127.0.0.1:1", accelerator=a)
        for a in ("cpu", "gpu", "inferentia")
    }
    assert {a for a, b in configs.items() if model.placed_on(b)} == placed


@given(
    model=st.sampled_from(["m", "other"]) | st.text(max_size=300),
    version=st.none() | st.integers(-(2**63), 2**63 - 1),
    label=st.none() | st.sampled_from(["stable", "gone"]) | st.text(max_size=300),
)
def test_any_model_version_and_label_route_or_get_a_bounded_status(
    model: str, version: int | None, label: str | None
) -> None:
    t = table(route({1: [A], 2: [B]}, labels={"stable": 1, "gone": 7}), known=frozenset({"x"}))
    try:
        resolved, targets = t.resolve(model, version, label)
    except GatewayError as exc:
        assert exc.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE), exc
        assert len(exc.message) < 1000  # the caller's own words are cut (ECHO_LIMIT)
        return
    assert model == "m" and resolved in (1, 2) and targets
