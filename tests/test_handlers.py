"""Realtime handlers end to end: handler files in the seeds' style run in handler workers of a real
gateway, against a real embedded backend, with models mirrored by a real modelsync from a local
folder. Invoke, a user-defined service (also through grpcurl), live reload and the model cache of a
python handler, and handlers that raise, hang or die."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from conftest import MODELMUX, ROOT, Proc, start_daemon
from gateway_helpers import wait_for, wait_serving
from google.protobuf import json_format, message_factory
from test_gateway import IRIS, IRIS_INPUTS, X, grpcurl

from gateway.handlers import userproto
from modelmux.v1 import inference_pb2, inference_pb2_grpc

HANDLERS = Path(__file__).parent / "handlers"


def write_counters(folder: Path, model: str, version: int, value: int) -> None:
    path = folder / model / str(version)
    path.mkdir(parents=True, exist_ok=True)
    (path / "value.txt").write_text(str(value))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, example_models: Path) -> Iterator[Proc]:
    root = tmp_path_factory.mktemp("handlers")
    source = root / "source"
    for name, model in (
        ("iris", "iris"),
        ("iris_b", "iris"),
        ("iris_c", "iris"),
        ("iris_d", "iris"),
    ):
        shutil.copytree(example_models / model, source / name)
    shutil.copytree(example_models / "half_plus_two", source / "half_plus_two")
    counters = source / "counters"
    for i in range(5):
        write_counters(counters, f"c{i}", 1, 100 * i)
    backend = start_daemon(["backend", "--listen", "127.0.0.1:0", "--poll-interval", "200ms"])
    config = root / "modelmux.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "gateway": {
                    "listen": "127.0.0.1:0",
                    "status_interval": "200ms",
                    "shutdown_grace": "5s",
                },
                "modelsync": {
                    "listen": "127.0.0.1:0",
                    "target": str(root / "volume"),
                    "poll_interval": "1s",
                    "settle": "0s",
                    "debounce": "200ms",
                },
                "backends": [{"name": "only", "address": backend.address}],
                "apis": [
                    {
                        "name": "iris",
                        "handler": {
                            "type": "tensorflow",
                            "path": str(HANDLERS / "iris_predictor.py"),
                            "models": {"path": str(source / "iris")},
                        },
                    },
                    {
                        "name": "multi",
                        "handler": {
                            "type": "tensorflow",
                            "path": str(HANDLERS / "multi_model.py"),
                            "models": {
                                "paths": [
                                    {
                                        "name": "half_plus_two",
                                        "path": str(source / "half_plus_two"),
                                    },
                                    {"name": "iris_b", "path": str(source / "iris_b")},
                                ]
                            },
                        },
                    },
                    {
                        "name": "classifier",
                        "handler": {
                            "type": "tensorflow",
                            "path": str(HANDLERS / "iris_service.py"),
                            "protobuf_path": str(HANDLERS / "iris_service.proto"),
                            "models": {"path": str(source / "iris_c")},
                        },
                    },
                    {
                        "name": "counter",
                        "handler": {
                            "type": "python",
                            "path": str(HANDLERS / "counter.py"),
                            "config": {"offset": 1},
                            "multi_model_reloading": {
                                "dir": str(counters),
                                "cache_size": 2,
                                "disk_cache_size": 3,
                            },
                        },
                    },
                    {
                        "name": "slow",
                        "handler": {
                            "type": "tensorflow",
                            "path": str(HANDLERS / "slow_predict.py"),
                            "config": {"delay": 1.5},
                            "models": {"path": str(source / "iris_d")},
                        },
                    },
                    {
                        "name": "pair",
                        "handler": {
                            "type": "python",
                            "path": str(HANDLERS / "faulty.py"),
                            "processes_per_replica": 2,
                        },
                    },
                    {
                        "name": "faulty",
                        "handler": {
                            "type": "python",
                            "path": str(HANDLERS / "faulty.py"),
                            "threads_per_process": 2,
                        },
                    },
                ],
            }
        )
    )
    sync = start_daemon(["sync", "--config", str(config)])
    gateway = start_daemon(
        ["gateway", "--config", str(config)], env={"MODELMUX_GATEWAY_MODELSYNC": sync.address}
    )
    gateway.source = source  # type: ignore[attr-defined]
    wait_serving(gateway.address)
    yield gateway
    for proc in (gateway, sync, backend):
        proc.stop()


@pytest.fixture
async def stub(stack: Proc) -> AsyncIterator[inference_pb2_grpc.InferenceStub]:
    async with grpc.aio.insecure_channel(stack.address) as channel:
        yield inference_pb2_grpc.InferenceStub(channel)


def invoke_request(api: str, payload: Any = None, **query: str) -> inference_pb2.InvokeRequest:
    request = inference_pb2.InvokeRequest(api=api, query_params=query)
    if payload is not None:
        json_format.ParseDict(payload, request.json)
    return request


async def invoke(
    stub: inference_pb2_grpc.InferenceStub,
    api: str,
    payload: Any = None,
    *,
    metadata: tuple[tuple[str, str], ...] = (),
    timeout: float = 30,
    **query: str,
) -> Any:
    reply = await stub.Invoke(
        invoke_request(api, payload, **query), timeout=timeout, metadata=metadata
    )
    return json_format.MessageToDict(reply.json) if reply.HasField("json") else reply.raw


def flower(name: str) -> dict[str, float]:
    return dict(zip(IRIS_INPUTS, IRIS[name], strict=True))


# --- TensorFlow handlers ---------------------------------------------------------------------


async def test_seed_iris_predictor_gets_the_labels(stub: inference_pb2_grpc.InferenceStub) -> None:
    """The seed's TensorFlowPredictor posts scalars; the signature's [-1] inputs get vectors."""
    for name in IRIS:
        assert await invoke(stub, "iris", flower(name)) == name
    # the seed's own example payload
    seed = {"sepal_length": 5.2, "sepal_width": 3.6, "petal_length": 1.4, "petal_width": 0.3}
    assert await invoke(stub, "iris", seed) == "setosa"


async def test_multi_model_handler_takes_model_and_version_from_query_params(
    stub: inference_pb2_grpc.InferenceStub,
) -> None:
    half = await invoke(stub, "multi", {"x": X}, model="half_plus_two", version="1")
    assert half == {"y": [2.5, 3.0, 4.5]}
    latest = await invoke(stub, "multi", {"x": X}, model="half_plus_two", version="latest")
    assert latest == {"y": [3.5, 4.0, 5.5]}  # version 2 is the highest
    iris = await invoke(stub, "multi", flower("virginica"), model="iris_b", version="latest")
    assert iris["class_ids"] == [2] and len(iris["probabilities"]) == 3


async def test_tensorflow_client_errors_keep_their_status(
    stub: inference_pb2_grpc.InferenceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await invoke(stub, "multi", {"x": X}, model="nope", version="latest")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nope" in (err.value.details() or "")
    # a model the gateway serves for another API is not this API's
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await invoke(stub, "multi", flower("setosa"), model="iris", version="latest")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "API 'multi' has no model 'iris'" in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await invoke(stub, "multi", {"y": X}, model="half_plus_two", version="1")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "missing x" in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await invoke(stub, "multi", {"x": ["a"]}, model="half_plus_two", version="1")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_invoke_bad_requests(stub: inference_pb2_grpc.InferenceStub, stack: Proc) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await invoke(stub, "no-such-api", {})
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-api" in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await invoke(stub, "", {})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    async with grpc.aio.insecure_channel(stack.address) as channel:
        raw = channel.unary_unary("/modelmux.v1.Inference/Invoke")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await raw(b"\x0a\xff", timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_grpcurl_invokes_a_handler(stack: Proc) -> None:
    body = json.dumps({"api": "iris", "json": flower("versicolor")})
    out = await grpcurl("-d", body, stack.address, "modelmux.v1.Inference/Invoke")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"json": "versicolor"}


# --- user-defined service --------------------------------------------------------------------


async def test_user_service_is_listed_described_and_called_with_grpcurl(stack: Proc) -> None:
    listed = await grpcurl(stack.address, "list")
    assert "acme.iris.v1.IrisClassifier" in listed.stdout.split(), listed.stderr
    described = await grpcurl(stack.address, "describe", "acme.iris.v1.IrisClassifier")
    assert (
        "rpc Classify ( .acme.iris.v1.Flower ) returns ( .acme.iris.v1.Label )" in described.stdout
    )
    assert "returns ( stream .acme.iris.v1.Label )" in described.stdout
    one = await grpcurl(
        "-d", json.dumps(flower("virginica")), stack.address, "acme.iris.v1.IrisClassifier/Classify"
    )
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout) == {"label": "virginica", "method": "Classify"}
    many = await grpcurl(
        "-d",
        json.dumps({"flowers": [flower(n) for n in IRIS]}),
        stack.address,
        "acme.iris.v1.IrisClassifier/ClassifyMany",
    )
    assert many.returncode == 0, many.stderr
    replies = [json.loads(chunk) for chunk in many.stdout.replace("}\n{", "}\x00{").split("\x00")]
    assert replies == [{"label": n, "method": "ClassifyMany"} for n in IRIS]


async def test_handler_sets_its_own_status(stack: Proc) -> None:
    """context.abort in a service method is the caller's status, not INTERNAL."""
    out = await grpcurl(
        "-d", json.dumps(flower("setosa")), stack.address, "acme.iris.v1.IrisClassifier/Reject"
    )
    assert out.returncode != 0
    assert "FailedPrecondition" in out.stderr and "no flowers today" in out.stderr, out.stderr
    async with grpc.aio.insecure_channel(stack.address) as channel:
        raw = channel.unary_unary("/acme.iris.v1.IrisClassifier/Classify")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await raw(b"\x0d\x01", timeout=10)  # a float field cut short
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "acme.iris.v1.Flower" in (err.value.details() or "")


async def test_user_service_streams_both_ways(stack: Proc) -> None:
    """Client-streaming and bidirectional RPCs reach their own methods through the gateway."""
    file = userproto.load(
        userproto.compile_proto(str(HANDLERS / "iris_service.proto")),
        str(HANDLERS / "iris_service.proto"),
    )
    flower_cls = message_factory.GetMessageClass(file.message_types_by_name["Flower"])
    label_cls = message_factory.GetMessageClass(file.message_types_by_name["Label"])
    flowers = [flower_cls(**flower(n)) for n in IRIS]
    service = "/acme.iris.v1.IrisClassifier/"
    async with grpc.aio.insecure_channel(stack.address) as channel:
        bidi = channel.stream_stream(
            service + "ClassifyStream",
            request_serializer=flower_cls.SerializeToString,
            response_deserializer=label_cls.FromString,
        )
        replies = [r async for r in bidi(iter(flowers), timeout=30)]
        assert [(r.label, r.method) for r in replies] == [(n, "ClassifyStream") for n in IRIS]
        count = channel.stream_unary(
            service + "CountFlowers",
            request_serializer=flower_cls.SerializeToString,
            response_deserializer=label_cls.FromString,
        )
        reply = await count(iter(flowers * 2), timeout=30)
        assert (reply.label, reply.method) == ("6", "CountFlowers")


async def test_user_service_streams_refuse_bytes_that_do_not_parse(stack: Proc) -> None:
    """INVALID_ARGUMENT naming the message for every shape of RPC (issue 19): a server-streaming
    request in the gateway, a client stream's message in the worker (grpc's deserializer ended
    the call with INTERNAL there)."""
    service = "/acme.iris.v1.IrisClassifier/"
    garbage = b"\x0a\xff\xff"
    async with grpc.aio.insecure_channel(stack.address) as channel:
        calls = [
            channel.unary_stream(service + "ClassifyMany")(garbage, timeout=30),
            channel.stream_stream(service + "ClassifyStream")(iter([garbage]), timeout=30),
        ]
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in call:
                    pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await channel.stream_unary(service + "CountFlowers")(iter([garbage]), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert "acme.iris.v1.Flower" in (err.value.details() or "")


# --- python handler: live reload and cache limits ----------------------------------------------


async def test_python_handler_model_reloads_live_and_cache_limits_hold(
    stub: inference_pb2_grpc.InferenceStub, stack: Proc
) -> None:
    counters: Path = stack.source / "counters"  # type: ignore[attr-defined]

    async def value(model: str, version: str | None = None) -> int:
        query = {"model": model} | ({"version": version} if version else {})
        reply = await invoke(stub, "counter", None, **query)
        return int(reply["value"])

    async def synced_value(model: str) -> int | None:
        try:
            return await value(model)
        except grpc.aio.AioRpcError:
            return None

    # config offset 1 is added by the handler
    assert await wait_for(lambda: synced_value("c3"), timeout=30, what="c3 loaded") == 301
    # a new version is used by get_model() without a restart
    write_counters(counters, "c0", 2, 7)
    await wait_for(lambda: _equals(value("c0"), 8), timeout=30, what="c0 version 2 served")
    assert await value("c0", "1") == 1
    # touch more models than fit, round and round
    for _ in range(3):
        for i in range(5):
            assert await value(f"c{i}") == (8 if i == 0 else 100 * i + 1)
    stats = await invoke(stub, "counter", None, stats="1")
    assert stats["max_alive"] <= 2, stats
    assert stats["max_on_disk"] <= 3, stats
    assert stats["loads"] >= 15
    assert all("/cache-" in p for p in stats["paths"]), stats["paths"][:3]
    # a rewrite in place of the version in use is picked up too
    (counters / "c4" / "1" / "value.txt").write_text("55")
    await wait_for(lambda: _equals(value("c4"), 56), timeout=30, what="c4 rewritten")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await value("c9")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # a removed version leaves: latest is version 1 again
    shutil.rmtree(counters / "c0" / "2")
    await wait_for(lambda: _equals(value("c0"), 1), timeout=30, what="c0 version 2 removed")


async def _equals(result: Any, expected: Any) -> bool:
    try:
        return bool(await result == expected)
    except grpc.aio.AioRpcError:
        return False


# --- faults ----------------------------------------------------------------------------------


async def test_handler_exception_is_internal_with_request_id_and_trace_in_log(
    stub: inference_pb2_grpc.InferenceStub, stack: Proc
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await invoke(stub, "faulty", {}, mode="raise", metadata=(("x-request-id", "req-raise-1"),))
    assert err.value.code() == grpc.StatusCode.INTERNAL
    details = err.value.details() or ""
    assert "req-raise-1" in details and "ValueError" in details
    assert "Traceback" not in details and "payload made" not in details

    def logged() -> dict[str, Any] | None:
        return next(
            (
                x
                for x in stack.lines
                if x.get("event") == "handler_failed" and x.get("request_id") == "req-raise-1"
            ),
            None,
        )

    line = await wait_for(logged, timeout=10, what="the handler_failed log line")
    assert "Traceback" in str(line.get("exception")) and "payload made" in str(line["exception"])


async def test_payload_headers_bytes_and_debug_logging(
    stub: inference_pb2_grpc.InferenceStub, stack: Proc
) -> None:
    echoed = await invoke(
        stub,
        "faulty",
        {"a": [1, 2], "b": "x"},
        mode="echo",
        metadata=(("x-tenant", "t1"), ("x-modelmux-debug", "true"), ("x-request-id", "dbg-1")),
    )
    assert echoed == {"payload": {"a": [1, 2], "b": "x"}, "tenant": "t1"}
    line = await wait_for(
        lambda: next(
            (
                x
                for x in stack.lines
                if x.get("event") == "handler_debug" and x.get("request_id") == "dbg-1"
            ),
            None,
        ),
        timeout=10,
        what="the handler_debug line",
    )
    assert line["payload"] == {"a": [1, 2], "b": "x"}
    assert await invoke(stub, "faulty", None, mode="bytes") == b"\x00\x01raw"
    # a raw payload reaches the handler as bytes
    raw = await stub.Invoke(
        inference_pb2.InvokeRequest(api="faulty", raw=b"plain text", query_params={"mode": "echo"}),
        timeout=30,
    )
    assert json_format.MessageToDict(raw.json)["payload"] == "plain text"
    kind = await stub.Invoke(
        inference_pb2.InvokeRequest(api="faulty", raw=b"\xff", query_params={"mode": "type"}),
        timeout=30,
    )
    assert kind.json.string_value == "bytes"


async def test_calls_spread_over_the_worker_processes(
    stub: inference_pb2_grpc.InferenceStub,
) -> None:
    """Two slow calls at once go to the two worker processes of an API (one thread each)."""
    replies = await asyncio.gather(
        *(invoke(stub, "pair", {}, mode="hang", seconds="0.5") for _ in range(2))
    )
    assert len({r["pid"] for r in replies}) == 2, replies


async def test_hanging_handler_hits_the_deadline_while_others_serve(
    stub: inference_pb2_grpc.InferenceStub, stack: Proc
) -> None:
    hang = asyncio.create_task(
        invoke(
            stub,
            "faulty",
            {},
            mode="hang",
            seconds="5",
            timeout=1.0,
            metadata=(("x-request-id", "req-hang"),),
        )
    )
    # while it hangs, another API and the same API's second thread answer
    assert await invoke(stub, "iris", flower("setosa")) == "setosa"
    assert "pid" in await invoke(stub, "faulty", {}, mode="ok")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await hang
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # the gateway records the caller's deadline as such, not as a lost worker
    line = await wait_for(
        lambda: next(
            (
                x
                for x in stack.lines
                if x.get("event") == "request"
                and x.get("request_id") == "req-hang"
                and x.get("rpc") == "modelmux.v1.Inference/Invoke"
            ),
            None,
        ),
        timeout=10,
        what="the hanging call's request line",
    )
    assert line["status"] in ("CANCELLED", "DEADLINE_EXCEEDED"), line


async def test_dying_worker_fails_its_call_and_is_replaced(
    stub: inference_pb2_grpc.InferenceStub, stack: Proc
) -> None:
    before = (await invoke(stub, "faulty", {}, mode="ok"))["pid"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await invoke(stub, "faulty", {}, mode="die", metadata=(("x-request-id", "req-die"),))
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "req-die" in (err.value.details() or "")
    assert await invoke(stub, "iris", flower("virginica")) == "virginica"

    async def replaced() -> bool:
        reply = await _answer(stub)
        return reply is not None and reply["pid"] != before

    await wait_for(replaced, timeout=60, what="a new faulty worker")
    assert any(x.get("event") == "handler_worker_exited" for x in stack.lines)


async def _answer(stub: inference_pb2_grpc.InferenceStub) -> Any:
    try:
        return await invoke(stub, "faulty", {}, mode="ok", timeout=5)
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
        return None


async def test_stuck_worker_is_replaced(stub: inference_pb2_grpc.InferenceStub) -> None:
    """Both threads of the faulty API's worker hang past their deadline: the worker exits and is
    replaced, so the API answers again."""
    before = (await wait_for(lambda: _answer(stub), timeout=60, what="a faulty worker"))["pid"]
    hangs = [
        asyncio.create_task(invoke(stub, "faulty", {}, mode="hang", seconds="120", timeout=1.0))
        for _ in range(2)
    ]
    for hang in hangs:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await hang
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    async def answers_from_a_new_worker() -> bool:
        try:
            reply = await invoke(stub, "faulty", {}, mode="ok", timeout=2)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply["pid"] != before)

    await wait_for(answers_from_a_new_worker, timeout=60, what="the stuck worker replaced")


# --- start-up failures -----------------------------------------------------------------------


def test_init_failure_stops_start_up_with_the_reason(tmp_path: Path) -> None:
    handler = tmp_path / "broken.py"
    handler.write_text(
        "class Handler:\n"
        "    def __init__(self, config):\n"
        "        raise RuntimeError('no vocabulary at /mnt/user/vocab.txt')\n"
    )
    config = tmp_path / "modelmux.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "gateway": {"listen": "127.0.0.1:0"},
                "apis": [{"name": "broken", "handler": {"type": "python", "path": str(handler)}}],
            }
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "modelmux_common.cli", "gateway", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert (
        "Handler.__init__ raised RuntimeError: no vocabulary at /mnt/user/vocab.txt" in done.stderr
    )
    assert "API 'broken'" in done.stderr


# --- last: stops the module's gateway ----------------------------------------------------------


async def test_sigterm_lets_a_handler_in_flight_finish_its_predict(
    stub: inference_pb2_grpc.InferenceStub, stack: Proc
) -> None:
    """An Invoke accepted before SIGTERM completes, including the handler's own Predict call
    through the draining gateway."""
    call = asyncio.create_task(invoke(stub, "slow", flower("virginica")))
    await wait_for(
        lambda: any(x.get("metric") == "slow_started" for x in stack.lines),
        timeout=10,
        what="the slow handler running",
    )
    stack.popen.send_signal(signal.SIGTERM)
    assert await call == [2]  # the flat values of class_ids [[2]]


def test_caching_with_several_gateway_workers_is_refused(tmp_path: Path) -> None:
    """--workers on the command line reaches the worker processes' config checks too."""
    handler = tmp_path / "h.py"
    handler.write_text(
        "class Handler:\n    def __init__(self, config, model_client):\n        pass\n"
    )
    config = tmp_path / "modelmux.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "gateway": {"listen": "127.0.0.1:0", "modelsync": "127.0.0.1:1"},
                "apis": [
                    {
                        "name": "cached",
                        "handler": {
                            "type": "python",
                            "path": str(handler),
                            "multi_model_reloading": {
                                "path": str(tmp_path),
                                "cache_size": 1,
                                "disk_cache_size": 1,
                            },
                        },
                    }
                ],
            }
        )
    )
    done = subprocess.run(
        [*MODELMUX, "gateway", "--config", str(config), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "model caching needs gateway.workers: 1" in done.stderr
