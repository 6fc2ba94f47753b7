"""Say why (issue 16): a model the config names but cannot serve is listed with its state and the
reason, its calls fail with FAILED_PRECONDITION (refused, failed) or UNAVAILABLE (not there yet)
naming it, and nothing keeps the rest of the stack from starting. Also: ``sync --once`` fails
when a model ends with nothing published, handler workers' log lines say which API and worker
wrote them from every thread, one wording for an unknown input name, and (issue 18) a gateway
that reconnects to another modelsync instance at the same address starts over from a snapshot.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import structlog
import yaml
from conftest import MODELMUX, ROOT, Proc, start_daemon
from gateway_helpers import health_status, start_gateway, wait_for
from gateway_helpers import write_config as gateway_config
from google.protobuf import json_format
from grpc_health.v1 import health_pb2
from modelsync_helpers import (
    SyncProcess,
    cpu_model,
    free_port,
    inf_model,
    running,
    wait_event,
    write_tree,
)
from modelsync_helpers import api as sync_api
from modelsync_helpers import write_config as sync_config

from gateway.server import Gateway
from modelmux.modelsync.v1 import modelsync_pb2, modelsync_pb2_grpc
from modelmux.v1 import inference_pb2, inference_pb2_grpc, models_pb2, models_pb2_grpc, tensor_pb2
from modelmux_common import config as config_mod
from modelmux_common.tfserving import predict_pb2
from modelsync.events import EventKind

from backend.tfserving import prediction_service_pb2_grpc  # isort: skip

X = [1.0, 2.0, 5.0]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
INFERENTIA_LAYOUT = "the Inferentia layout is saved_model.pb only"


def typed(model: str, name: str = "x", **spec: Any) -> inference_pb2.PredictRequest:
    tensor = tensor_pb2.Tensor(
        dtype=tensor_pb2.DATA_TYPE_FLOAT32,
        shape=[len(X)],
        content=np.asarray(X, dtype="<f4").tobytes(),
    )
    return inference_pb2.PredictRequest(model=model, inputs={name: tensor}, **spec)


def as_json(model: str, name: str = "x") -> inference_pb2.PredictRequest:
    request = inference_pb2.PredictRequest(model=model)
    request.json_inputs.update({name: X})
    return request


def facade(model: str) -> Any:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.inputs["x"].dtype = 1
    request.inputs["x"].tensor_shape.dim.add().size = len(X)
    request.inputs["x"].tensor_content = np.asarray(X, dtype="<f4").tobytes()
    return request


def listed(stub: models_pb2_grpc.ModelsStub) -> dict[str, models_pb2.Model]:
    reply = stub.ListModels(models_pb2.ListModelsRequest(), timeout=10)
    return {m.name: m for m in reply.models}


def status_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), str(info.value.details())


def tf_api(name: str, path: Path, *, inf: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "handler": {"type": "tensorflow", "models": {"path": str(path)}},
    }
    if inf:
        spec["compute"] = {"inf": 1}
    return spec


# ---- the acceptance stack: `modelmux up` with one healthy and one mis-laid API -----------------


class Up:
    """``modelmux up`` as a child process; stdout (the banner) and stderr (every component's JSON
    log lines) are collected by reader threads."""

    def __init__(self, config: Path, address: str) -> None:
        self.address = address
        self.out: list[str] = []
        self.lines: list[dict[str, Any]] = []
        self.popen = subprocess.Popen(
            [*MODELMUX, "up", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "MODELMUX_LOG_FORMAT": "json"},
            cwd=ROOT,
        )
        self._readers = [
            threading.Thread(target=self._read, args=(self.popen.stdout, False), daemon=True),
            threading.Thread(target=self._read, args=(self.popen.stderr, True), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: Any, log: bool) -> None:
        with stream:
            for raw in stream:
                if not log:
                    self.out.append(raw)
                    continue
                start = raw.find('{"')
                if start >= 0:
                    try:
                        self.lines.append(json.loads(raw[start:]))
                    except ValueError:
                        pass

    def logged(self, event: str) -> list[dict[str, Any]]:
        return [line for line in list(self.lines) if line.get("event") == event]

    def wait_banner(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any("is SERVING on" in line for line in self.out):
            code = self.popen.poll()
            assert code is None, f"modelmux up exited {code}; log: {self.lines[-30:]}"
            assert time.monotonic() < deadline, f"no SERVING banner; log: {self.lines[-30:]}"
            time.sleep(0.1)

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(60)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        for reader in self._readers:
            reader.join(10)
        return self.popen.returncode


@pytest.fixture(scope="module")
def up_stack(tmp_path_factory: pytest.TempPathFactory, example_models: Path) -> Iterator[Up]:
    root = tmp_path_factory.mktemp("up")
    healthy, misplaced = root / "src" / "healthy", root / "src" / "badinf"
    shutil.copytree(example_models / "half_plus_two" / "1", healthy / "1")
    # a CPU SavedModel (it has variables/) under an API on Inferentia: modelsync refuses it
    shutil.copytree(example_models / "half_plus_two" / "1", misplaced / "1")
    sync = f"127.0.0.1:{free_port()}"
    doc = {
        "gateway": {
            "listen": f"127.0.0.1:{free_port()}",
            "modelsync": sync,
            "status_interval": "200ms",
            "shutdown_grace": "1s",
        },
        "modelsync": {
            "listen": sync,
            "target": str(root / "volume"),
            "settle": "0s",
            "debounce": "100ms",
        },
        "backends": [{"name": "cpu-0", "address": f"127.0.0.1:{free_port()}"}],
        "apis": [tf_api("healthy", healthy), tf_api("badinf", misplaced, inf=True)],
    }
    config = root / "modelmux.yaml"
    config.write_text(yaml.safe_dump(doc))
    up = Up(config, doc["gateway"]["listen"])
    try:
        up.wait_banner(timeout=180)
        yield up
    finally:
        up.stop()


def test_up_serves_the_healthy_api_and_says_why_the_other_is_not(up_stack: Up) -> None:
    address = up_stack.address
    with grpc.insecure_channel(address) as channel:
        own = inference_pb2_grpc.InferenceStub(channel)
        tf = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        models = listed(models_pb2_grpc.ModelsStub(channel))

        assert models["healthy"].state == models_pb2.MODEL_STATE_AVAILABLE
        assert models["healthy"].reason == ""
        bad = models["badinf"]
        assert bad.api == "badinf" and bad.state == models_pb2.MODEL_STATE_REFUSED
        assert INFERENTIA_LAYOUT in bad.reason and "version 1" in bad.reason, bad
        assert [(v.version, v.routable) for v in bad.versions] == [(1, False)]
        assert INFERENTIA_LAYOUT in bad.versions[0].refusal

        reply = own.Predict(typed("healthy"), timeout=10)
        assert np.frombuffer(reply.outputs["y"].content, dtype="<f4").tolist() == [2.5, 3.0, 4.5]

        for call in (
            lambda: own.Predict(typed("badinf"), timeout=10),
            lambda: own.Predict(as_json("badinf"), timeout=10),
            lambda: tf.Predict(facade("badinf"), timeout=10),
        ):
            code, details = status_of(call)
            assert code == grpc.StatusCode.FAILED_PRECONDITION, details
            assert details == (  # as docs/routing.md shows it
                "model 'badinf' cannot be served: modelsync refused version 1: the Inferentia "
                "layout is saved_model.pb only (a compiled model has no variables/), but "
                "variables/ holds 2 file(s)"
            )
        code, details = status_of(lambda: own.Predict(typed("nope"), timeout=10))
        assert code == grpc.StatusCode.NOT_FOUND and "badinf, healthy" in details, details

    async def health() -> tuple[int, int, int]:
        return (
            await health_status(address),
            await health_status(address, "modelmux.v1.Model/healthy"),
            await health_status(address, "modelmux.v1.Model/badinf"),
        )

    assert asyncio.run(health()) == (SERVING, SERVING, NOT_SERVING)
    # one line at start says what cannot be served and why
    (line,) = up_stack.logged("models_not_servable")
    assert [m["model"] for m in line["models"]] == ["badinf"]
    assert line["models"][0]["state"] == "REFUSED"
    assert INFERENTIA_LAYOUT in line["models"][0]["reason"]
    assert up_stack.logged("validation_failed")
    time.sleep(1.0)
    assert up_stack.popen.poll() is None  # up keeps the stack running


# ---- the same, in process: states, a fix that makes a model servable, --strict ------------------


async def test_states_follow_what_modelsync_says(
    tmp_path: Path, example_models: Path, backend: Proc
) -> None:
    good, bad, empty = (tmp_path / "src" / n for n in ("good", "bad", "empty"))
    shutil.copytree(example_models / "half_plus_two" / "1", good / "1")
    shutil.copytree(example_models / "half_plus_two" / "1", bad / "1")
    empty.mkdir()
    apis = [tf_api("good", good), tf_api("bad", bad, inf=True), tf_api("empty", empty)]
    sync_file, loaded = sync_config(tmp_path, apis, listen=f"127.0.0.1:{free_port()}")
    async with running(loaded) as daemon:
        doc = yaml.safe_load(sync_file.read_text())
        doc["gateway"] = {
            "listen": "127.0.0.1:0",
            "modelsync": daemon.address,
            "status_interval": "200ms",
        }
        doc["backends"] = [{"name": "cpu-0", "address": backend.address}]
        sync_file.write_text(yaml.safe_dump(doc))
        with structlog.testing.capture_logs() as logged:
            gateway = await start_gateway(sync_file)
        try:
            lines = [e for e in logged if e["event"] == "models_not_servable"]
            assert [[m["model"] for m in e["models"]] for e in lines] == [["bad", "empty"]]
            async with grpc.aio.insecure_channel(gateway.address) as channel:
                own = inference_pb2_grpc.InferenceStub(channel)
                models = models_pb2_grpc.ModelsStub(channel)
                reply = await models.GetModel(models_pb2.GetModelRequest(name="empty"))
                assert reply.model.state == models_pb2.MODEL_STATE_REFUSED
                assert "holds no files" in reply.model.reason
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await own.Predict(typed("empty"), timeout=10)
                assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "holds no files" in str(info.value.details())

                # a version appears at the empty source: the model becomes servable
                shutil.copytree(example_models / "half_plus_two" / "2", empty / "2")

                async def served() -> bool:
                    try:
                        return (await own.Predict(typed("empty"), timeout=10)).version == 2
                    except grpc.aio.AioRpcError:
                        return False

                await wait_for(served, timeout=30, what="the fixed model served")
                reply = await models.GetModel(models_pb2.GetModelRequest(name="empty"))
                assert reply.model.state == models_pb2.MODEL_STATE_AVAILABLE, reply
                assert reply.model.reason == ""
                assert await health_status(gateway.address, "modelmux.v1.Model/empty") == SERVING

                # a refused version beside a good one: the model serves, the version says why
                staged = tmp_path / "staged-3"
                shutil.copytree(example_models / "half_plus_two" / "1", staged)
                (staged / "variables" / "variables.index").unlink()
                staged.rename(empty / "3")

                async def refused_3() -> str:
                    reply = await models.GetModel(models_pb2.GetModelRequest(name="empty"))
                    found = [v.refusal for v in reply.model.versions if v.version == 3]
                    return found[0] if found else ""

                assert "no variables.index" in await wait_for(
                    refused_3, timeout=30, what="version 3 refused"
                )
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await own.Predict(typed("empty", version=3), timeout=10)
                assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "modelsync refused version 3" in str(info.value.details())
                assert (await own.Predict(typed("empty"), timeout=10)).version == 2
        finally:
            await gateway.stop()


async def test_strict_start_fails_when_a_model_cannot_be_served(
    tmp_path: Path, example_models: Path, backend: Proc
) -> None:
    good, bad = tmp_path / "src" / "good", tmp_path / "src" / "bad"
    shutil.copytree(example_models / "half_plus_two" / "1", good / "1")
    shutil.copytree(example_models / "half_plus_two" / "1", bad / "1")
    sync_file, loaded = sync_config(
        tmp_path,
        [tf_api("good", good), tf_api("bad", bad, inf=True)],
        listen=f"127.0.0.1:{free_port()}",
    )
    async with running(loaded) as daemon:
        doc = yaml.safe_load(sync_file.read_text())
        doc["gateway"] = {"listen": "127.0.0.1:0", "modelsync": daemon.address}
        doc["backends"] = [{"name": "cpu-0", "address": backend.address}]
        sync_file.write_text(yaml.safe_dump(doc))
        gateway = Gateway(config_mod.load(sync_file), strict=True)
        address = await gateway.start()
        try:
            await wait_for(gateway.start_failed.is_set, timeout=30, what="strict start failed")
            assert await health_status(address) == NOT_SERVING
            assert await health_status(address, "modelmux.v1.Model/good") == SERVING
        finally:
            await gateway.stop()


# ---- modelsync: refusals in the snapshot, cleared, and the instance ------------------------------


async def test_refusals_are_listed_cleared_and_resume_needs_the_same_instance(
    tmp_path: Path,
) -> None:
    source = tmp_path / "src" / "m"
    source.mkdir(parents=True)
    _, loaded = sync_config(tmp_path, [sync_api("m", {"path": str(source)}, inf=True)])
    async with running(loaded) as daemon:
        empty = await wait_event(daemon, EventKind.VALIDATION_FAILED, model="m")
        assert empty.version is None and "holds no files" in empty.reason
        write_tree(tmp_path / "staged", cpu_model("one"))  # CPU layout under Inferentia
        (tmp_path / "staged").rename(source / "1")
        refused = await wait_event(
            daemon, EventKind.VALIDATION_FAILED, model="m", version=1, after=empty.revision
        )
        cleared = await wait_event(daemon, EventKind.VALIDATION_CLEARED, after=empty.revision)
        assert cleared.reason == empty.reason and cleared.version is None
        async with grpc.aio.insecure_channel(daemon.address) as channel:
            stub = modelsync_pb2_grpc.ModelSyncStub(channel)
            listing = await stub.ListModels(modelsync_pb2.ListModelsRequest())
            assert [(r.model, r.version, r.revision) for r in listing.refused] == [
                ("m", 1, refused.revision)
            ]
            assert INFERENTIA_LAYOUT in listing.refused[0].reason and listing.instance

            async def first(request: modelsync_pb2.WatchEventsRequest) -> Any:
                stream = stub.WatchEvents(request)
                item = await stream.read()
                stream.cancel()
                return item

            item = await first(modelsync_pb2.WatchEventsRequest())
            assert item.instance == listing.instance
            assert [r.version for r in item.snapshot.refused] == [1]
            same = modelsync_pb2.WatchEventsRequest(
                from_revision=empty.revision, instance=listing.instance
            )
            item = await first(same)  # the same instance: the events after it are replayed
            assert item.replayed and item.event.revision == empty.revision + 1
            other = modelsync_pb2.WatchEventsRequest(from_revision=empty.revision, instance="x")
            item = await first(other)
            assert item.snapshot.reason == modelsync_pb2.SNAPSHOT_REASON_INSTANCE_CHANGED
            assert item.instance == listing.instance

        write_tree(source / "1", inf_model("one"))  # fixed in place
        shutil.rmtree(source / "1" / "variables")
        await wait_event(daemon, EventKind.VERSION_ADDED, model="m", version=1)
        fixed = await wait_event(
            daemon, EventKind.VALIDATION_CLEARED, version=1, after=refused.revision
        )
        assert fixed.reason == refused.reason
        async with grpc.aio.insecure_channel(daemon.address) as channel:
            stub = modelsync_pb2_grpc.ModelSyncStub(channel)

            async def nothing_refused() -> bool:
                listing = await stub.ListModels(modelsync_pb2.ListModelsRequest())
                return not listing.refused

            await wait_for(nothing_refused, timeout=10, what="no refusal left")


def sync_once(config: Path) -> tuple[int, list[dict[str, Any]]]:
    done = subprocess.run(
        [*MODELMUX, "sync", "--config", str(config), "--once"],
        env={**os.environ, "MODELMUX_LOG_FORMAT": "json"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = []
    for raw in done.stderr.splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:
            pass
    return done.returncode, lines


def test_sync_once_fails_when_a_configured_model_has_nothing_published(tmp_path: Path) -> None:
    good, bad, empty = (tmp_path / "src" / n for n in ("good", "bad", "empty"))
    write_tree(good / "1", cpu_model("good"))
    write_tree(bad / "1", cpu_model("bad"))  # CPU layout under an Inferentia API
    empty.mkdir()
    apis = [
        sync_api("good", {"path": str(good)}),
        sync_api("bad", {"path": str(bad)}, inf=True),
        sync_api("empty", {"path": str(empty)}),
    ]
    (tmp_path / "some").mkdir()
    config, _ = sync_config(tmp_path / "some", apis)
    code, lines = sync_once(config)
    assert code == 3, lines
    (line,) = [e for e in lines if e.get("event") == "nothing_published"]
    by_model = {m["model"]: m for m in line["models"]}
    assert sorted(by_model) == ["bad", "empty"]
    assert INFERENTIA_LAYOUT in by_model["bad"]["reasons"][0]
    assert by_model["bad"]["reasons"][0].startswith("version 1: ")
    assert "holds no files" in by_model["empty"]["reasons"][0]

    (tmp_path / "all").mkdir()
    config, _ = sync_config(tmp_path / "all", apis[:1])
    code, lines = sync_once(config)
    assert code == 0, lines
    assert not [e for e in lines if e.get("event") == "nothing_published"]


# ---- a gateway follows a different modelsync at the same address --------------------------------


async def test_a_new_modelsync_at_the_same_address_is_followed_from_a_snapshot(
    tmp_path: Path, example_models: Path, backend: Proc
) -> None:
    port = free_port()
    half = example_models / "half_plus_two"
    configs = {}
    for name, versions in (("a", (1,)), ("b", (1, 2))):
        source = tmp_path / name / "src" / "m"
        for v in versions:
            shutil.copytree(half / str(v), source / str(v))
        (tmp_path / name).mkdir(exist_ok=True)
        configs[name], _ = sync_config(
            tmp_path / name, [tf_api("m", source)], listen=f"127.0.0.1:{port}"
        )
    doc = yaml.safe_load(configs["a"].read_text())
    doc["gateway"] = {
        "listen": "127.0.0.1:0",
        "modelsync": f"127.0.0.1:{port}",
        "status_interval": "200ms",
    }
    doc["backends"] = [{"name": "cpu-0", "address": backend.address}]
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(doc))

    first = SyncProcess(["sync", "--config", str(configs["a"])])
    second: SyncProcess | None = None
    try:
        await first.serving()
        gateway = await start_gateway(tmp_path / "gateway.yaml")
        try:
            assert gateway.follower is not None
            old = gateway.follower.instance
            assert old
            async with grpc.aio.insecure_channel(gateway.address) as channel:
                own = inference_pb2_grpc.InferenceStub(channel)

                async def latest() -> int:
                    try:
                        return (await own.Predict(typed("m"), timeout=10)).version
                    except grpc.aio.AioRpcError:
                        return 0

                assert await latest() == 1
                with structlog.testing.capture_logs() as logged:
                    first.finish()
                    second = SyncProcess(["sync", "--config", str(configs["b"])])
                    await second.serving()
                    # its history (v1, v2 as revisions 1 and 2) is not the first one's
                    await wait_for(
                        lambda: latest_is(latest, 2), timeout=30, what="version 2 served"
                    )
                assert gateway.follower.instance not in ("", old)
                snapshots = [e for e in logged if e["event"] == "modelsync_snapshot"]
                reason = modelsync_pb2.SNAPSHOT_REASON_INSTANCE_CHANGED
                assert [e["reason"] for e in snapshots] == [reason], logged
                # a version the new instance publishes later loads too
                shutil.copytree(half / "2", tmp_path / "b" / "src" / "m" / "3")
                await wait_for(lambda: latest_is(latest, 3), timeout=30, what="version 3 served")
                y = (await own.Predict(typed("m", version=1), timeout=10)).outputs["y"]
                assert np.frombuffer(y.content, dtype="<f4").tolist() == [2.5, 3.0, 4.5]
        finally:
            await gateway.stop()
    finally:
        first.finish()
        if second is not None:
            second.finish()


async def latest_is(latest: Any, version: int) -> bool:
    return bool(await latest() == version)


# ---- handler workers' log lines and the unknown input wording -----------------------------------


def test_two_python_apis_log_their_own_api_from_every_thread(
    tmp_path: Path, example_models: Path, backend: Proc
) -> None:
    models = example_models / "python"
    handler = str(ROOT / "examples" / "python-handler" / "handler.py")
    empty = tmp_path / "empty"
    empty.mkdir()
    apis = [
        {  # loaded on the first call, on the call's thread
            "name": "py-a",
            "handler": {
                "type": "python",
                "path": handler,
                "multi_model_reloading": {
                    "paths": [{"name": "fahrenheit", "path": str(models / "fahrenheit")}],
                    "cache_size": 1,
                    "disk_cache_size": 1,
                },
            },
        },
        {  # loaded ahead of any call, on a thread of its own
            "name": "py-b",
            "handler": {
                "type": "python",
                "path": handler,
                "multi_model_reloading": {
                    "paths": [{"name": "kelvin", "path": str(models / "kelvin")}]
                },
            },
        },
        {  # its source is empty: modelsync refuses it, and get_model() says why
            "name": "py-c",
            "handler": {
                "type": "python",
                "path": handler,
                "multi_model_reloading": {"paths": [{"name": "rankine", "path": str(empty)}]},
            },
        },
    ]
    config, _ = sync_config(tmp_path, apis)
    sync = start_daemon(["sync", "--config", str(config)])
    procs = [sync]
    try:
        doc = yaml.safe_load(config.read_text())
        doc["gateway"] = {"listen": "127.0.0.1:0", "modelsync": sync.address}
        doc["backends"] = [{"name": "cpu-0", "address": backend.address}]
        config.write_text(yaml.safe_dump(doc))
        gateway = start_daemon(["gateway", "--config", str(config)])
        procs.insert(0, gateway)
        with grpc.insecure_channel(gateway.address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            for api_name, model, field in (("py-a", "fahrenheit", 212), ("py-b", "kelvin", 373.15)):
                if api_name == "py-b":  # its load must be the one ahead of any call, not the call's
                    deadline = time.monotonic() + 30
                    while not any(
                        e.get("event") == "model_loaded" and e.get("model") == model
                        for e in gateway.lines
                    ):
                        assert time.monotonic() < deadline, "py-b never loaded kelvin on its own"
                        time.sleep(0.1)
                request = inference_pb2.InvokeRequest(api=api_name, query_params={"model": model})
                json_format.ParseDict({"celsius": 100}, request.json)
                deadline = time.monotonic() + 30
                while True:  # until the worker's modelsync stream has the model
                    try:
                        reply = stub.Invoke(
                            request, timeout=30, metadata=(("x-request-id", f"rid-{api_name}"),)
                        )
                        break
                    except grpc.RpcError as exc:
                        assert time.monotonic() < deadline, exc
                        time.sleep(0.2)
                assert list(json_format.MessageToDict(reply.json).values()) == [field]
            request = inference_pb2.InvokeRequest(api="py-c", query_params={"model": "rankine"})
            json_format.ParseDict({"celsius": 100}, request.json)
            with pytest.raises(grpc.RpcError) as info:
                stub.Invoke(request, timeout=30)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value
            assert "holds no files" in str(info.value.details())

        def loaded() -> dict[str, dict[str, object]]:
            return {
                str(e.get("model")): e for e in gateway.lines if e.get("event") == "model_loaded"
            }

        deadline = time.monotonic() + 10
        while len(loaded()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        lines = loaded()
        assert lines["fahrenheit"]["api"] == "py-a", lines
        assert lines["fahrenheit"]["handler_worker"] == 0
        assert lines["fahrenheit"]["request_id"] == "rid-py-a"  # inside the call
        assert lines["kelvin"]["api"] == "py-b", lines
        assert lines["kelvin"]["handler_worker"] == 0
        assert "request_id" not in lines["kelvin"]  # loaded ahead, outside any call
        ready = [e for e in gateway.lines if e.get("event") == "handler_worker_ready"]
        assert sorted(str(e["api"]) for e in ready) == ["py-a", "py-b", "py-c"]
    finally:
        for proc in procs:
            proc.stop()


async def test_an_unknown_input_name_reads_the_same_in_both_request_forms(
    tmp_path: Path, example_models: Path, backend: Proc
) -> None:
    config = gateway_config(
        tmp_path / "modelmux.yaml",
        models=example_models,
        backends=[{"name": "cpu-0", "address": backend.address}],
    )
    gateway = await start_gateway(config)
    try:
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            own = inference_pb2_grpc.InferenceStub(channel)
            answers = []
            # typed first: the signature is not cached yet when the backend refuses the input
            for request in (typed("half_plus_two", "z"), as_json("half_plus_two", "z")):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await own.Predict(request, timeout=10)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                answers.append(info.value.details())
            assert answers[0] == answers[1], answers
            assert answers[0] == ("unknown input 'z': signature 'serving_default' has the inputs x")
    finally:
        await gateway.stop()


def test_refusals_and_states_read_as_one_sentence_each() -> None:
    from gateway.catalog import refusal_text
    from gateway.errors import FailedPrecondition, NotFound, Unavailable
    from gateway.routing import ModelStatus, Table

    assert refusal_text({2: "bad", 1: "bad"}) == "modelsync refused versions 1, 2: bad"
    assert refusal_text({None: "empty", 3: "odd"}) == (
        "modelsync refused it: empty; modelsync refused version 3: odd"
    )
    table = Table(
        known=frozenset({"r", "l"}),
        states={"r": ModelStatus("REFUSED", "why"), "l": ModelStatus("LOADING", "version 1")},
    )
    for model, kind, text in (
        ("r", FailedPrecondition, "model 'r' cannot be served: why"),
        ("l", Unavailable, "model 'l' has no version available yet: version 1"),
        ("x", NotFound, "model 'x' is not served here (models: l, r)"),
    ):
        with pytest.raises(kind) as info:
            table.resolve(model, None, None)
        assert info.value.message == text
