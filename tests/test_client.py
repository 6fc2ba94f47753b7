"""modelmux.client against a live gateway process and the embedded backend: numpy round trips
for every dtype and shape, versions and labels, Invoke, listing and watching, health, deadlines,
several channels over several gateway workers, and retries across a gateway restart."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from client_helpers import NUMERIC_DTYPES, start_client_gateway
from conftest import Proc

from modelmux.client import (
    AsyncClient,
    Client,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    RetryPolicy,
    UnavailableError,
)
from modelmux.v1 import models_pb2, models_pb2_grpc

SHAPES = [(), (0,), (3,), (2, 3), (2, 0, 4), (1, 2, 3, 2)]


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, example_models: Path, backend: Proc
) -> Iterator[Proc]:
    proc = start_client_gateway(
        tmp_path_factory.mktemp("client-gw"), models=example_models, backend=backend
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(gateway: Proc) -> Iterator[Client]:
    with Client(gateway.address) as c:
        yield c


def sample(dtype: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray[Any, Any]:
    """Values that use the dtype's range (negative, large, fractional, both booleans)."""
    kind = np.dtype(dtype).kind
    if kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    if kind == "f":
        return (rng.standard_normal(size=shape) * 1000).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


def strings(shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    """Text, empty strings, NUL bytes and bytes that are not UTF-8."""
    pool = [b"modelmux", b"", b"\x00nul\x00", b"\xff\xfe not utf-8", "héllo".encode()]
    out = np.empty(int(np.prod(shape)), dtype=object)
    out[:] = [pool[i % len(pool)] for i in range(out.size)]
    return out.reshape(shape)


def all_inputs(shape: tuple[int, ...], seed: int = 7) -> dict[str, np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    inputs = {name: sample(name, shape, rng) for name in NUMERIC_DTYPES}
    inputs["string"] = strings(shape)
    return inputs


def assert_round_trip(sent: dict[str, np.ndarray[Any, Any]], got: dict[str, Any]) -> None:
    assert set(got) == set(sent)
    for name, array in sent.items():
        back = got[name]
        assert isinstance(back, np.ndarray), name
        assert back.shape == array.shape, name
        if name == "string":
            assert back.dtype == object
            assert back.reshape(-1).tolist() == array.reshape(-1).tolist()
        else:
            assert back.dtype == np.dtype(name), name
            assert back.tobytes() == np.ascontiguousarray(array).tobytes(), name


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)) or "scalar")
def test_every_dtype_round_trips_in_every_shape(client: Client, shape: tuple[int, ...]) -> None:
    sent = all_inputs(shape)
    result = client.predict("dtypes", sent)
    assert (result.model, result.version, result.signature_name) == ("dtypes", 1, "serving_default")
    assert_round_trip(sent, result.outputs)


def test_numeric_outputs_are_views_over_the_reply(client: Client) -> None:
    result = client.predict("dtypes", all_inputs((4,)))
    out = result["float32"]
    assert not out.flags.writeable and not out.flags.owndata  # np.frombuffer: nothing copied
    assert out.copy().flags.writeable


def test_inputs_in_any_layout_and_byte_order(client: Client) -> None:
    base = all_inputs((4, 6), seed=11)
    sent: dict[str, Any] = {
        name: (array[:, ::2] if i % 3 == 0 else array.T if i % 3 == 1 else np.asfortranarray(array))
        for i, (name, array) in enumerate(base.items())
    }
    sent["float64"] = base["float64"].astype(">f8")  # big-endian in, little-endian on the wire
    sent["int32"] = base["int32"].astype(">i4")
    sent["string"] = np.array([["ab", "ç"], ["", "z"]])  # numpy str: sent as UTF-8
    result = client.predict("dtypes", sent)
    for name, array in sent.items():
        back = result[name]
        if name == "string":
            assert back.tolist() == [[b"ab", "ç".encode()], [b"", b"z"]]
        else:
            assert back.dtype == np.dtype(name) and back.shape == array.shape, name
            np.testing.assert_array_equal(back, array, err_msg=name)


def test_lists_and_bytes_arrays_are_accepted(client: Client) -> None:
    inputs: dict[str, Any] = {n: np.zeros((2,), dtype=n) for n in NUMERIC_DTYPES}
    inputs["string"] = np.array([b"a", b"bc"])  # numpy bytes_ ("S") array
    inputs["float64"] = [1.5, -2.5]  # a list becomes float64
    result = client.predict("dtypes", inputs)
    assert result["string"].tolist() == [b"a", b"bc"]
    assert result["float64"].tolist() == [1.5, -2.5]


def test_versions_and_labels(client: Client) -> None:
    x = {"x": np.array([1.0, 2.0, 5.0], dtype=np.float32)}
    latest = client.predict("half_plus_two", x)
    assert latest.version == 2 and latest["y"].tolist() == [3.5, 4.0, 5.5]
    v1 = client.predict("half_plus_two", x, version=1)
    assert v1.version == 1 and v1["y"].tolist() == [2.5, 3.0, 4.5]
    assert client.predict("half_plus_two", x, label="stable").version == 1
    assert client.predict("half_plus_two", x, label="canary").version == 2
    only_y = client.predict("half_plus_two", x, output_filter=["y"], signature="serving_default")
    assert list(only_y.outputs) == ["y"]
    with pytest.raises(ValueError, match="version or label"):
        client.predict("half_plus_two", x, version=1, label="stable")
    with pytest.raises(NotFoundError, match="version 7") as missing:
        client.predict("half_plus_two", x, version=7)
    assert missing.value.code.name == "NOT_FOUND"
    with pytest.raises(NotFoundError, match="nightly"):
        client.predict("half_plus_two", x, label="nightly")
    with pytest.raises(NotFoundError, match="no_such_model"):
        client.predict("no_such_model", x)


def test_bad_inputs_are_invalid_argument(client: Client) -> None:
    with pytest.raises(InvalidArgumentError, match="'x'"):
        client.predict("half_plus_two", {"x": np.array([1.0], dtype=np.float64)})
    with pytest.raises(TypeError, match="complex128"):
        client.predict("half_plus_two", {"x": np.array([1j])})
    with pytest.raises(TypeError, match="str or bytes"):
        client.predict("dtypes", {"string": np.array([b"a", 3], dtype=object)})


def test_invoke_json_raw_query_params_and_headers(client: Client) -> None:
    payload = {"text": "hi", "values": [1, 2.5], "nested": {"ok": True, "none": None}}
    echoed = client.invoke(
        "echo", payload, query_params={"mode": "echo"}, headers={"x-tenant": "t1"}
    )
    assert echoed == {"payload": {**payload, "values": [1.0, 2.5]}, "tenant": "t1"}
    assert client.invoke("echo", b"\x00raw", query_params={"mode": "type"}) == "bytes"
    assert client.invoke("echo", None, query_params={"mode": "type"}) == "NoneType"
    assert client.invoke("echo", query_params={"mode": "bytes"}) == b"\x00\x01raw"
    with pytest.raises(InternalError, match="request"):
        client.invoke("echo", {}, query_params={"mode": "raise"})
    with pytest.raises(NotFoundError):
        client.invoke("no-such-api", {})


def test_list_get_and_watch_models(client: Client) -> None:
    listed = {m.name: m for m in client.list_models()}
    assert {"half_plus_two", "dtypes"} <= set(listed)
    hpt = listed["half_plus_two"]
    assert hpt.state == models_pb2.MODEL_STATE_AVAILABLE and hpt.latest_version == 2
    assert dict(hpt.labels) == {"stable": 1, "canary": 2}
    assert client.get_model("dtypes").latest_version == 1
    with pytest.raises(NotFoundError):
        client.get_model("no_such_model")
    watch = client.watch_models(["half_plus_two"])
    with contextlib.closing(watch):
        first = next(watch)
    assert first.model.name == "half_plus_two" and not first.removed


def test_health(client: Client) -> None:
    assert client.health() == "SERVING"
    assert client.health("modelmux.v1.Model/half_plus_two") == "SERVING"
    with pytest.raises(NotFoundError):
        client.health("no.such.Service")


HANG = {"mode": "hang", "seconds": "1"}  # the echo API's handler sleeps this long


def test_deadline_applies_to_live_calls(client: Client, gateway: Proc) -> None:
    # a handler that takes seconds, not a sub-millisecond deadline on a fast call: grpc may
    # round a tiny deadline up far enough for a quick Predict to finish first
    x = {"x": np.array([1.0], dtype=np.float32)}
    with pytest.raises(DeadlineExceededError):
        client.invoke("echo", None, query_params=HANG, timeout=0.2)
    with Client(gateway.address, timeout=0.2) as hurried:
        with pytest.raises(DeadlineExceededError):
            hurried.invoke("echo", None, query_params=HANG)
        assert hurried.predict("half_plus_two", x, timeout=10).version == 2


async def test_async_face(gateway: Proc) -> None:
    async with AsyncClient(gateway.address) as aclient:
        x = {"x": np.arange(4, dtype=np.float32)}
        results = await asyncio.gather(
            *(aclient.predict("half_plus_two", x, version=1 + i % 2) for i in range(20))
        )
        assert [r.version for r in results] == [1 + i % 2 for i in range(20)]
        sent = all_inputs((2, 2))
        assert_round_trip(sent, (await aclient.predict("dtypes", sent)).outputs)
        assert await aclient.invoke("echo", [1, "a"], query_params={"mode": "echo"}) == {
            "payload": [1.0, "a"],
            "tenant": "",
        }
        assert "dtypes" in {m.name for m in await aclient.list_models()}
        assert (await aclient.get_model("half_plus_two")).labels["stable"] == 1
        assert await aclient.health() == "SERVING"
        updates = aclient.watch_models()
        names = set()
        async for update in updates:
            names.add(update.model.name)
            if {"half_plus_two", "dtypes"} <= names:
                break
        await updates.aclose()
        with pytest.raises(NotFoundError):
            await aclient.predict("half_plus_two", x, label="nightly")
        with pytest.raises(DeadlineExceededError):
            await aclient.invoke("echo", None, query_params=HANG, timeout=0.2)


def test_several_channels_reach_several_gateway_workers(
    tmp_path: Path, example_models: Path, backend: Proc
) -> None:
    proc = start_client_gateway(
        tmp_path, models=example_models, backend=backend, args=("--workers", "2")
    )
    try:
        # SO_REUSEPORT hands each connection to one worker; 16 connections all landing on the same
        # one of two workers has a chance of 2 in 65536.
        with Client(proc.address, channels=16) as spread:
            x = {"x": np.array([1.0], dtype=np.float32)}
            for _ in range(32):
                assert spread.predict("half_plus_two", x).version == 2
        workers = {line.get("worker") for line in proc.lines if line.get("event") == "request"}
        assert workers >= {0, 1}, workers
    finally:
        proc.stop()


def test_retries_ride_out_a_gateway_restart(
    tmp_path: Path, example_models: Path, backend: Proc
) -> None:
    (tmp_path / "a").mkdir()
    first = start_client_gateway(tmp_path / "a", models=example_models, backend=backend)
    address = first.address
    x = {"x": np.array([1.0], dtype=np.float32)}
    # Waits 0.5, 1, 2 and 4 s (each +-20%): 6 to 9 s for the new gateway to come up and route.
    patient = RetryPolicy(initial_backoff=0.5, max_backoff=4.0, backoff_multiplier=2.0)
    with Client(address, retry=patient) as retrying, Client(address, retry=None) as once:
        assert retrying.predict("half_plus_two", x).version == 2
        assert first.stop() == 0
        with pytest.raises(UnavailableError):
            once.predict("half_plus_two", x)  # no gateway, no retries: fails at once
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            call = pool.submit(retrying.predict, "half_plus_two", x)  # first attempt: refused
            (tmp_path / "b").mkdir()
            second = start_client_gateway(
                tmp_path / "b", models=example_models, backend=backend, gateway={"listen": address}
            )
            try:
                assert call.result(timeout=30).version == 2
            finally:
                second.stop()


async def test_async_watch_sees_a_label_move(gateway: Proc) -> None:
    """An open watch gets an update when routing changes (here: a label moves, then back)."""
    async with AsyncClient(gateway.address) as aclient:
        updates = aclient.watch_models(["half_plus_two"])
        first = await anext(updates)
        assert first.model.labels["stable"] == 1
        admin = models_pb2_grpc.ModelsStub(aclient._pool[0].channel)  # admin calls: the raw stub
        move = models_pb2.SetVersionLabelRequest(model="half_plus_two", label="stable", version=2)
        await admin.SetVersionLabel(move, timeout=10)
        try:
            async with asyncio.timeout(15):
                async for update in updates:
                    if update.model.labels["stable"] == 2:
                        break
        finally:
            move.version = 1
            await admin.SetVersionLabel(move, timeout=10)
            await updates.aclose()
