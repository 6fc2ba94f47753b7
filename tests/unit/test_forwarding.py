"""The forwarder against in-memory backends: when it pins a call to the version routing chose
and when it sends the caller's bytes, retrying once elsewhere, ejection and the in-flight limits.

A call for latest goes out unchanged when the chosen backend's own latest is the routed version
(no copy of a large request); labels, a split's pick of a lower version, newer versions still
loading or about to be unloaded, and backends this process does not configure get the pin.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from gateway.admission import Admission
from gateway.edge import Call
from gateway.errors import ResourceExhausted, Unavailable
from gateway.forwarding import EJECT_AFTER, Forwarder
from gateway.request import resolve
from gateway.routing import Endpoint, Table, Target
from gateway.transport import MemoryTransport, rpc_error
from modelmux_common.tfserving import get_model_metadata_pb2, predict_pb2
from unit.unit_helpers import context, endpoint, predict_reply, table


def _request(version: int | None = None, label: str = "", model: str = "m") -> bytes:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    if version is not None:
        request.model_spec.version.value = version
    if label:
        request.model_spec.version_label = label
    request.inputs["x"].float_val.append(1.0)
    return bytes(request.SerializeToString())


def _forwarder(limit: int = 10) -> Forwarder:
    return Forwarder(timeout=5.0, backend_max_inflight=limit)


async def _send(
    routes: Table,
    data: bytes,
    *,
    version: int | None = None,
    label: str | None = None,
    forwarder: Forwarder | None = None,
    model: str = "m",
) -> bytes:
    ctx = context()
    request = resolve(routes, "Predict", data, model=model, version=version, label=label)
    return await (forwarder or _forwarder()).send(request, ctx, Call(ctx))


async def _sent(
    top: bool, *, version: int | None = None, label: str | None = None, split: bool = False
) -> bytes:
    seen: list[bytes] = []

    async def predict(method: str, data: bytes) -> bytes:
        seen.append(data)
        return b""

    backend = endpoint("b", predict)
    versions = {1: (Target(backend, "m", False),), 2: (Target(backend, "m", top),)}
    routes = table(versions, labels={"stable": 2}, split={1: 1} if split else {})
    data = _request(version, label or "")
    await _send(routes, data, version=version, label=label)
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


async def test_a_servable_of_another_name_is_named_in_the_request_and_unnamed_in_the_reply() -> (
    None
):
    seen: list[bytes] = []

    async def metadata(method: str, data: bytes) -> bytes:
        seen.append(data)
        reply = get_model_metadata_pb2.GetModelMetadataResponse()
        reply.model_spec.name = "m@r7"
        return bytes(reply.SerializeToString())

    routes = table({1: (Target(endpoint("b", metadata), "m@r7", True),)})
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "m"
    ctx = context()
    resolved = resolve(
        routes, "GetModelMetadata", request.SerializeToString(), model="m", version=None,
        label=None,
    )  # fmt: skip
    raw = await _forwarder().send(resolved, ctx, Call(ctx))
    spec = get_model_metadata_pb2.GetModelMetadataRequest.FromString(seen[0]).model_spec
    assert (spec.name, spec.version.value) == ("m@r7", 1)
    assert get_model_metadata_pb2.GetModelMetadataResponse.FromString(raw).model_spec.name == "m"


class Flaky:
    """A backend answering with ``code`` (None: a reply) and counting the calls it gets."""

    def __init__(self, code: grpc.StatusCode | None) -> None:
        self.code = code
        self.calls = 0
        self.pokes = 0

    async def __call__(self, method: str, data: bytes) -> bytes:
        self.calls += 1
        if self.code is not None:
            raise rpc_error(self.code, f"{self.code.name} from the test")
        return predict_reply()

    def endpoint(self, name: str) -> Endpoint:
        backend = endpoint(name, self)
        backend.poke = self.poke
        return backend

    def poke(self) -> None:
        self.pokes += 1


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND])
async def test_a_call_the_backend_never_ran_is_retried_once_on_another(
    code: grpc.StatusCode,
) -> None:
    bad, good = Flaky(code), Flaky(None)
    routes = table({1: (Target(bad.endpoint("bad"), "m"), Target(good.endpoint("good"), "m"))})
    for _ in range(6):
        await _send(routes, _request(1), version=1)
    assert good.calls == 6  # every call answered, some after a first try on "bad"
    assert bad.pokes == bad.calls  # each failure asked bad's reconciler to look


async def test_a_call_no_backend_could_run_says_which_backends_failed() -> None:
    a, b = Flaky(grpc.StatusCode.UNAVAILABLE), Flaky(grpc.StatusCode.UNAVAILABLE)
    routes = table({1: (Target(a.endpoint("a"), "m"), Target(b.endpoint("b"), "m"))})
    with pytest.raises(Unavailable, match=r"backends . and . could not run the call"):
        await _send(routes, _request(1), version=1)
    assert a.calls == b.calls == 1  # once each, no more


async def test_an_answer_the_backend_gave_is_not_retried() -> None:
    refusing, other = Flaky(grpc.StatusCode.INVALID_ARGUMENT), Flaky(None)
    routes = table({1: (Target(refusing.endpoint("r"), "m"), Target(other.endpoint("o"), "m"))})
    refusals = 0
    for _ in range(8):
        try:
            await _send(routes, _request(1), version=1)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
            refusals += 1
    assert refusals == refusing.calls and other.calls == 8 - refusals


async def test_a_failing_backend_is_ejected_while_another_holds_the_version() -> None:
    down, up = Flaky(grpc.StatusCode.UNAVAILABLE), Flaky(None)
    sick = down.endpoint("down")
    routes = table({1: (Target(sick, "m"), Target(up.endpoint("up"), "m"))})
    while sick.ejected_until == 0.0:
        await _send(routes, _request(1), version=1)
    assert down.calls == EJECT_AFTER
    for _ in range(10):
        await _send(routes, _request(1), version=1)
    assert down.calls == EJECT_AFTER  # routing avoids it for a while


class Held:
    """A backend that holds every call until released; ``arrived(n)`` once n calls are held."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.held = 0
        self._arrival = asyncio.Event()

    async def __call__(self, method: str, data: bytes) -> bytes:
        self.held += 1
        self._arrival.set()
        await self.release.wait()
        return predict_reply()

    async def arrived(self, count: int) -> None:
        async with asyncio.timeout(5):
            while self.held < count:
                self._arrival.clear()
                await self._arrival.wait()


async def test_the_backend_in_flight_limit_refuses_at_once() -> None:
    slow = Held()
    backend = endpoint("b", slow)
    routes = table({1: (Target(backend, "m"),)})
    forwarder = _forwarder(limit=2)
    running = [
        asyncio.ensure_future(_send(routes, _request(1), version=1, forwarder=forwarder))
        for _ in range(2)
    ]
    await slow.arrived(2)
    with pytest.raises(ResourceExhausted, match=r"gateway\.backend_max_inflight"):
        await _send(routes, _request(1), version=1, forwarder=forwarder)
    slow.release.set()
    await asyncio.gather(*running)
    assert backend.outstanding == 0


async def test_admission_counts_every_call_until_its_answer() -> None:
    slow = Held()
    routes = table({1: (Target(endpoint("b", slow), "m"),)})
    admission = Admission(_forwarder().send, max_inflight=1)
    ctx = context()
    first = asyncio.ensure_future(
        admission.send(
            resolve(routes, "Predict", _request(1), model="m", version=1, label=None),
            ctx,
            Call(ctx),
        )
    )
    await slow.arrived(1)
    with pytest.raises(ResourceExhausted, match=r"gateway\.max_inflight"):
        await admission.send(
            resolve(routes, "Predict", _request(1), model="m", version=1, label=None),
            ctx,
            Call(ctx),
        )
    slow.release.set()
    await first
    assert admission.inflight == 0


async def test_the_memory_transport_records_what_it_was_sent() -> None:
    transport = MemoryTransport(Flaky(None))
    assert await transport.forward("Predict", b"x", timeout=1.0) == predict_reply()
    assert transport.sent == [("Predict", b"x")]
