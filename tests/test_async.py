"""Async APIs end to end on the embedded store: a real gateway process with real handler workers,
a real embedded backend for the TensorFlow handlers written as the seeds show them, the Python
client (sync and asyncio), grpcurl through reflection, and the /metrics endpoint."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from async_helpers import (
    HANDLERS,
    RECORDER,
    counts,
    recorder_api,
    start_gateway,
    wait_until,
    write_config,
)
from conftest import Proc
from test_gateway import GRPCURL

from modelmux.client import (
    AlreadyExistsError,
    AsyncClient,
    Client,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from modelmux.v1 import async_pb2, async_pb2_grpc
from modelmux_common.config import AsyncConfig, ConfigError, load

FLOWER = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
EMBEDDED: dict[str, Any] = {}


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, example_models: Path, backend: Proc
) -> Iterator[tuple[Proc, Path]]:
    root = tmp_path_factory.mktemp("async")
    models = root / "models"
    for name, model in (("iris", "iris"), ("iris_multi", "iris"), ("plain", "iris")):
        shutil.copytree(example_models / model, models / name)
    shutil.copytree(example_models / "half_plus_two", models / "half_plus_two")
    log = root / "runs.log"
    apis = [
        {
            "name": "iris-async",
            "kind": "AsyncAPI",
            "handler": {
                "type": "tensorflow",
                "path": str(HANDLERS / "async_seed.py"),
                "config": {"labels": ["setosa", "versicolor", "virginica"]},
                "models": {"path": str(models / "iris")},
            },
        },
        {
            "name": "multi-async",
            "kind": "AsyncAPI",
            "handler": {
                "type": "tensorflow",
                "path": str(HANDLERS / "async_seed_multi.py"),
                "models": {
                    "paths": [
                        {"name": "half_plus_two", "path": str(models / "half_plus_two")},
                        {"name": "iris_multi", "path": str(models / "iris_multi")},
                    ]
                },
            },
        },
        recorder_api("recorder", log, store=EMBEDDED, threads=2, max_attempts=2),
        recorder_api(
            "tight",
            log,
            store=EMBEDDED,
            max_queued=2,
            max_payload_bytes=1000,
        ),
        recorder_api("brief", log, store=EMBEDDED, result_ttl="1s"),
        {
            "name": "plain",
            "handler": {"type": "tensorflow", "models": {"path": str(models / "plain")}},
        },
    ]
    config = write_config(
        root / "modelmux.yaml", apis, backend=backend.address, metrics_listen="127.0.0.1:0"
    )
    proc = start_gateway(config)
    with Client(proc.address) as client:
        wait_until(lambda: client.health() == "SERVING", timeout=60, what="SERVING")
    yield proc, log
    proc.stop()


@pytest.fixture(scope="module")
def client(stack: tuple[Proc, Path]) -> Iterator[Client]:
    with Client(stack[0].address, timeout=30) as c:
        yield c


def watched(client: Client, request_id: str) -> list[Any]:
    return list(client.watch(request_id, timeout=60))


def test_seed_handlers_results_through_get_and_watch(client: Client) -> None:
    rid = client.submit("iris-async", FLOWER)
    updates = watched(client, rid)
    assert updates[-1].state == "COMPLETED"
    assert [u.state for u in updates][-1:] == ["COMPLETED"]
    assert all(u.state in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED") for u in updates)
    assert updates[-1].result == {"label": "setosa", "request_id": rid}
    got = client.get(rid)
    assert (got.state, got.result, got.attempts) == ("COMPLETED", updates[-1].result, 1)
    assert got.submitted_at <= got.started_at <= got.finished_at < got.expires_at  # type: ignore[operator]

    # predict(model_input, model_name, model_version): version 2 (y = x/2 + 3) and latest
    for version, y in (("1", [2.5, 3.0]), (None, [3.5, 4.0])):
        payload = {"x": [1.0, 2.0], "flower": FLOWER, "version": version}
        done = watched(client, client.submit("multi-async", payload))[-1]
        assert done.state == "COMPLETED", done
        assert done.result == {"y": y, "class_id": 0}


async def test_asyncio_client(stack: tuple[Proc, Path]) -> None:
    async with AsyncClient(stack[0].address, timeout=30) as client:
        rid = await client.submit("recorder", {"delay": 0.2}, request_id="aio-1")
        assert rid == "aio-1"
        states = [u.state async for u in client.watch(rid, timeout=30)]
        assert states[0] in ("IN_QUEUE", "IN_PROGRESS") and states[-1] == "COMPLETED"
        got = await client.get(rid, api="recorder")
        assert got.result == {"id": rid, "payload": {"delay": 0.2}, "type": "dict"}
        page, _ = await client.list_requests("recorder", states=["COMPLETED"])
        assert rid in [r.id for r in page]
        with pytest.raises(FailedPreconditionError, match="already ended: COMPLETED"):
            await client.cancel(rid)


def test_payload_decoded_by_content_type(client: Client) -> None:
    cases: list[tuple[Any, str, Any]] = [
        ({"a": [1, 2]}, "", {"payload": {"a": [1, 2]}, "type": "dict"}),
        ([1, "x"], "", {"payload": [1, "x"], "type": "list"}),
        (b'{"b": 1}', "application/json", {"payload": {"b": 1}, "type": "dict"}),
        ("héllo".encode(), "text/plain; charset=utf-8", {"payload": "héllo", "type": "str"}),
        (b"\x00\x01raw", "application/octet-stream", b"war\x01\x00"),
    ]
    for payload, content_type, expected in cases:
        rid = client.submit("recorder", payload, content_type=content_type or "x")
        done = watched(client, rid)[-1]
        if isinstance(expected, dict):
            expected = {"id": rid, **expected}
        assert (done.state, done.result) == ("COMPLETED", expected), payload


def test_bad_input_gets_precise_statuses(client: Client, stack: tuple[Proc, Path]) -> None:
    with pytest.raises(NotFoundError, match="no API named 'nope'"):
        client.submit("nope", {})
    with pytest.raises(FailedPreconditionError, match="'plain' is a RealtimeAPI, not an AsyncAPI"):
        client.submit("plain", {})
    with pytest.raises(ResourceExhaustedError, match=r"async.max_payload_bytes \(1000\)"):
        client.submit("tight", b"x" * 1001)
    with pytest.raises(InvalidArgumentError, match="is not a request id"):
        client.submit("recorder", {}, request_id="../etc")
    with pytest.raises(InvalidArgumentError, match="is not a request id"):
        client.get("bad id!")
    with pytest.raises(InvalidArgumentError, match="raw payload is not valid application/json"):
        client.submit("recorder", b"{not json", content_type="application/json")
    with pytest.raises(InvalidArgumentError, match="not valid text/plain"):
        client.submit("recorder", b"\xff\xfe", content_type="text/plain")
    with pytest.raises(NotFoundError, match="no request 'never-submitted'") as unknown:
        client.get("never-submitted")
    assert "expired" not in str(unknown.value)
    with pytest.raises(InvalidArgumentError, match="api is required"):
        client.list_requests("")
    # Invoke on an AsyncAPI names the right RPC
    with pytest.raises(FailedPreconditionError, match=r"modelmux\.v1\.Async/Submit"):
        client.invoke("recorder", {})
    # an undecodable request message
    with grpc.insecure_channel(stack[0].address) as channel:
        submit = channel.unary_unary("/modelmux.v1.Async/Submit")
        with pytest.raises(grpc.RpcError) as raw:
            submit(b"\xff\xff\xff", timeout=10)
        assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_idempotent_submit(client: Client) -> None:
    rid = client.submit("recorder", {"n": 1}, request_id="same-1")
    again = async_pb2.SubmitRequest(api="recorder", id="same-1")
    again.json.struct_value.update({"n": 1})
    with grpc.insecure_channel(client.settings.target) as channel:
        reply = async_pb2_grpc.AsyncStub(channel).Submit(again, timeout=10)
    assert (reply.id, reply.created) == (rid, False)
    with pytest.raises(AlreadyExistsError, match="exists with another payload"):
        client.submit("recorder", {"n": 2}, request_id="same-1")
    assert watched(client, rid)[-1].result == {"id": rid, "payload": {"n": 1}, "type": "dict"}
    # after it ended too
    with grpc.insecure_channel(client.settings.target) as channel:
        assert not async_pb2_grpc.AsyncStub(channel).Submit(again, timeout=10).created
    with pytest.raises(AlreadyExistsError):
        client.submit("recorder", {"n": 3}, request_id="same-1")


def test_handler_error_retried_then_failed(client: Client, stack: tuple[Proc, Path]) -> None:
    rid = client.submit("recorder", {"fail": "boom"})
    updates = watched(client, rid)
    done = updates[-1]
    assert done.state == "FAILED"
    assert done.error == "ValueError: asked to fail: boom"
    assert done.attempts == 2  # max_attempts
    assert counts(stack[1], "start")[rid] == 2
    assert any(u.state == "IN_QUEUE" and u.error for u in updates) or len(updates) >= 3
    # the trace went to the log only
    failed = [line for line in stack[0].lines if line.get("event") == "handler_failed"]
    assert any("Traceback" in str(line.get("exception", "")) for line in failed)


def test_queue_full_then_everything_accepted_completes(client: Client) -> None:
    first = client.submit("tight", {"delay": 1.0})
    second = client.submit("tight", {"delay": 0.1})
    with pytest.raises(ResourceExhaustedError, match=r"async.max_queued \(2\)"):
        client.submit("tight", {})
    for rid in (first, second):
        assert watched(client, rid)[-1].state == "COMPLETED"


def test_cancel_queued_never_runs_and_in_progress_is_discarded(
    client: Client, stack: tuple[Proc, Path]
) -> None:
    running = client.submit("tight", {"delay": 1.5})
    queued = client.submit("tight", {"delay": 0})
    wait_until(lambda: counts(stack[1], "start")[running], timeout=20, what="the first to start")
    cancelled = client.cancel(queued, api="tight")
    assert cancelled.state == "CANCELLED" and cancelled.error == "cancelled by a caller"
    assert client.cancel(running).state == "CANCELLED"
    wait_until(lambda: counts(stack[1], "done")[running], timeout=20, what="the handler to end")
    wait_until(
        lambda: 'modelmux_async_in_progress{api="tight"} 0.0' in scrape(stack[0]),
        timeout=20,
        what="the runner to record (and discard) the result",
    )
    for rid in (running, queued):
        got = client.get(rid)
        assert (got.state, got.result) == ("CANCELLED", None)
    assert counts(stack[1], "start")[queued] == 0
    with pytest.raises(FailedPreconditionError, match="already ended: CANCELLED"):
        client.cancel(queued)


def test_expired_result_says_expired(client: Client) -> None:
    rid = client.submit("brief", {"delay": 0})
    done = watched(client, rid)[-1]
    assert done.state == "COMPLETED" and done.expires_at is not None
    wait_until(lambda: time.time() > done.expires_at + 0.1, timeout=5, what="expiry")  # type: ignore[operator]
    with pytest.raises(NotFoundError, match=rf"request {rid} of API 'brief' expired at 20"):
        client.get(rid)


def test_list_pages_and_filters(client: Client) -> None:
    ids = {client.submit("recorder", {"i": i}) for i in range(3)}
    for rid in ids:
        watched(client, rid)
    seen: list[str] = []
    token = ""
    while True:
        page, token = client.list_requests("recorder", page_size=2, page_token=token)
        assert all(r.result is None for r in page)
        seen += [r.id for r in page]
        if not token:
            break
    assert ids <= set(seen) and len(seen) == len(set(seen))
    failed, _ = client.list_requests("recorder", states=["FAILED"], page_size=1000)
    assert ids.isdisjoint(r.id for r in failed)


def test_grpcurl_submit_get_watch(stack: tuple[Proc, Path]) -> None:
    address = stack[0].address

    def call(method: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        out = subprocess.run(
            [GRPCURL, "-plaintext", "-max-time", "30", "-d", json.dumps(body), address, method],
            capture_output=True,
            text=True,
            timeout=40,
        )
        assert out.returncode == 0, out.stderr
        decoder, text, items = json.JSONDecoder(), out.stdout.strip(), []
        while text:
            item, end = decoder.raw_decode(text)
            items.append(item)
            text = text[end:].strip()
        return items

    [submitted] = call("modelmux.v1.Async/Submit", {"api": "iris-async", "json": FLOWER})
    rid = submitted["id"]
    watch = call("modelmux.v1.Async/Watch", {"id": rid})
    assert watch[-1]["request"]["state"] == "ASYNC_STATE_COMPLETED"
    [got] = call("modelmux.v1.Async/Get", {"api": "iris-async", "id": rid})
    assert got["request"]["json"] == {"label": "setosa", "request_id": rid}
    assert got["request"]["attempts"] == 1


def scrape(proc: Proc) -> str:
    [line] = [entry for entry in proc.lines if entry.get("event") == "metrics"]
    with urllib.request.urlopen(f"http://127.0.0.1:{line['port']}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


def test_metrics_endpoint(client: Client, stack: tuple[Proc, Path]) -> None:
    rid = client.submit("iris-async", FLOWER)
    watched(client, rid)
    body = scrape(stack[0])
    assert 'modelmux_async_requests_total{api="iris-async",outcome="COMPLETED"}' in body
    assert 'modelmux_async_requests_total{api="recorder",outcome="FAILED"}' in body
    assert "modelmux_async_queued{" in body and "modelmux_async_in_progress{" in body
    assert 'seed_async_done_total{api="iris-async"}' in body
    # one structured line per state change, with request id, api and attempt
    states = [
        (entry["state"], entry["attempt"])
        for entry in stack[0].lines
        if entry.get("event") == "async_state" and entry.get("request_id") == rid
    ]
    assert states[0] == ("IN_QUEUE", 0) or states[0] == ("IN_PROGRESS", 1)
    assert states[-1] == ("COMPLETED", 1)


@pytest.mark.parametrize(
    ("api", "key", "reason"),
    [
        (
            {
                "name": "a",
                "kind": "RealtimeAPI",
                "async": {},
                "handler": {"type": "python", "path": RECORDER},
            },
            "apis[0].async",
            "only a kind: AsyncAPI has an async section",
        ),
        (
            {
                "name": "a",
                "kind": "AsyncAPI",
                "handler": {"type": "tensorflow", "models": {"path": "/m"}},
                "async": {},
            },
            "apis[0].handler.path",
            "runs handle_async",
        ),
        (
            {
                "name": "a",
                "kind": "AsyncAPI",
                "handler": {"type": "python", "path": RECORDER},
                "async": {"store": "aws"},
            },
            "apis[0].async.bucket",
            "needs the S3 bucket",
        ),
        (
            {
                "name": "a",
                "kind": "AsyncAPI",
                "handler": {"type": "python", "path": RECORDER},
                "async": {"store": "redis"},
            },
            "apis[0].async.store",
            "is not embedded or aws",
        ),
        (
            {
                "name": "a",
                "kind": "AsyncAPI",
                "handler": {"type": "python", "path": RECORDER},
                "async": {"max_queued": 0},
            },
            "apis[0].async.max_queued",
            "must be positive",
        ),
    ],
)
def test_async_config_errors_name_the_key(
    tmp_path: Path, api: dict[str, Any], key: str, reason: str
) -> None:
    path = tmp_path / "modelmux.yaml"
    path.write_text(yaml.safe_dump({"apis": [api]}))
    with pytest.raises(ConfigError) as error:
        load(path)
    assert (error.value.key, reason in error.value.reason) == (key, True), error.value


def test_async_config_defaults(tmp_path: Path) -> None:
    path = tmp_path / "modelmux.yaml"
    api = {"name": "a", "kind": "AsyncAPI", "handler": {"type": "python", "path": RECORDER}}
    path.write_text(yaml.safe_dump({"apis": [api]}))
    [loaded] = load(path).apis
    assert loaded.async_config == AsyncConfig()
    assert AsyncConfig().result_ttl == 7 * 24 * 3600 and AsyncConfig().store == "embedded"
