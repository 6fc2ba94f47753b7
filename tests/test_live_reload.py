"""Live reloading end to end, every piece a real process on loopback.

moto's S3 server holds the model sources; modelsync mirrors them onto a volume; three embedded
backends (two cpu/gpu, one inferentia) load from it; the gateway follows modelsync and routes.
A client keeps calling the gateway throughout, and each reload trigger must cause no failed call.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from conftest import Proc, start_daemon
from gateway_helpers import wait_for
from modelsync_helpers import MotoServer, moto_for_module, new_bucket

from modelmux.modelsync.v1 import modelsync_pb2, modelsync_pb2_grpc
from modelmux.v1 import inference_pb2, inference_pb2_grpc, models_pb2, models_pb2_grpc, tensor_pb2
from modelmux_common.tfserving import get_model_status_pb2, predict_pb2

from backend.tfserving import model_service_pb2_grpc, prediction_service_pb2_grpc  # isort: skip

POLL = 1.0  # modelsync's poll interval in this test
DEADLINE = POLL + 5.0  # the issue's bound for new content to be served
X = [1.0, 2.0, 5.0]
V1_Y = [2.5, 3.0, 4.5]  # 0.5x + 2
V2_Y = [3.5, 4.0, 5.5]  # 0.5x + 3


def files_of(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@dataclass
class Stack:
    s3: Any
    bucket: str
    models: Path
    backends: dict[str, Proc]
    sync: Proc
    gateway: Proc
    config: Path

    def put(self, prefix: str, files: dict[str, bytes]) -> None:
        for rel, body in files.items():
            self.s3.put_object(Bucket=self.bucket, Key=prefix + rel, Body=body)

    def delete(self, prefix: str) -> None:
        listed = self.s3.list_objects_v2(Bucket=self.bucket, Prefix=prefix).get("Contents", [])
        for obj in listed:
            self.s3.delete_object(Bucket=self.bucket, Key=obj["Key"])


@dataclass
class Load:
    """A client calling the gateway without pause; every outcome is recorded with its time."""

    address: str
    results: list[tuple[float, str, int, list[float] | str]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, model: str, api: str) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            own = inference_pb2_grpc.InferenceStub(channel)
            facade = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            while not self.stop.is_set():
                try:
                    if api == "own":
                        reply = await own.Predict(own_request(model), timeout=10)
                        y = np.frombuffer(reply.outputs["y"].content, dtype="<f4").tolist()
                        self.results.append((time.monotonic(), model, reply.version, y))
                    else:
                        tf_reply = await facade.Predict(tf_request(model), timeout=10)
                        y = np.frombuffer(
                            tf_reply.outputs["y"].tensor_content, dtype="<f4"
                        ).tolist()
                        self.results.append(
                            (time.monotonic(), model, tf_reply.model_spec.version.value, y)
                        )
                except grpc.aio.AioRpcError as exc:
                    self.results.append(
                        (time.monotonic(), model, -1, f"{exc.code().name}: {exc.details()}")
                    )

    def failures(self, since: float = 0.0) -> list[Any]:
        return [r for r in self.results if r[0] >= since and r[2] == -1]

    def served(self, model: str, version: int, y: list[float], since: float) -> bool:
        return any(
            r[0] >= since and r[1] == model and r[2] == version and r[3] == y for r in self.results
        )


def own_request(model: str) -> inference_pb2.PredictRequest:
    tensor = tensor_pb2.Tensor(
        dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[3], content=np.asarray(X, dtype="<f4").tobytes()
    )
    return inference_pb2.PredictRequest(model=model, inputs={"x": tensor})


def tf_request(model: str) -> Any:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.inputs["x"].dtype = 1
    request.inputs["x"].tensor_shape.dim.add().size = 3
    request.inputs["x"].tensor_content = np.asarray(X, dtype="<f4").tobytes()
    return request


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    yield from moto_for_module(tmp_path_factory)


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, example_models: Path, moto: MotoServer
) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("live")
    s3 = moto.client()
    bucket = new_bucket(moto)
    for rel, body in files_of(example_models / "half_plus_two" / "1").items():
        s3.put_object(Bucket=bucket, Key=f"models/half_plus_two/1/{rel}", Body=body)
    for rel, body in files_of(example_models / "half_plus_two_inf" / "1").items():
        s3.put_object(Bucket=bucket, Key=f"inf/half_plus_two_inf/1/{rel}", Body=body)
    names = {"gpu-0": "gpu", "cpu-1": "cpu", "inf-0": "inferentia"}
    backends = {
        name: start_daemon(
            [
                "backend",
                "--listen",
                "127.0.0.1:0",
                "--accelerator",
                accel,
                "--poll-interval",
                "200ms",
            ]
        )
        for name, accel in names.items()
    }
    config = root / "modelmux.yaml"
    doc = {
        "gateway": {"listen": "127.0.0.1:0", "status_interval": "200ms", "log_requests": False},
        "modelsync": {
            "listen": "127.0.0.1:0",
            "target": str(root / "volume"),
            "poll_interval": f"{POLL}s",
            "settle": "0s",
            "removal_grace": "30s",
            "s3_endpoint_url": moto.endpoint,
        },
        "backends": [
            {"name": n, "address": backends[n].address, "accelerator": a} for n, a in names.items()
        ],
        "apis": [
            {
                "name": "hpt",
                "handler": {
                    "type": "tensorflow",
                    "models": {
                        "paths": [
                            {
                                "name": "half_plus_two",
                                "path": f"s3://{bucket}/models/half_plus_two/",
                            }
                        ]
                    },
                },
            },
            {
                "name": "hpt-inf",
                "compute": {"inf": 1},
                "handler": {
                    "type": "tensorflow",
                    "models": {
                        "paths": [
                            {
                                "name": "half_plus_two_inf",
                                "path": f"s3://{bucket}/inf/half_plus_two_inf/",
                            }
                        ]
                    },
                },
            },
        ],
    }
    config.write_text(yaml.safe_dump(doc))
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    sync = start_daemon(["sync", "--config", str(config)], env=env)
    gateway = start_daemon(
        ["gateway", "--config", str(config)], env={"MODELMUX_GATEWAY_MODELSYNC": sync.address}
    )
    stack = Stack(s3, bucket, example_models, backends, sync, gateway, config)
    yield stack
    # tests replace processes they restart: stop what the stack holds now
    for proc in (stack.gateway, stack.sync, *stack.backends.values()):
        proc.stop()


PLACED = {"half_plus_two": {"gpu-0", "cpu-1"}, "half_plus_two_inf": {"inf-0"}}


async def placed(stack: Stack, version: int = 1) -> dict[str, set[str]]:
    """model -> the backends the gateway routes ``version`` of it to now."""
    async with grpc.aio.insecure_channel(stack.gateway.address) as channel:
        listing = await models_pb2_grpc.ModelsStub(channel).ListModels(
            models_pb2.ListModelsRequest(), timeout=5
        )
    available = models_pb2.VERSION_STATE_AVAILABLE
    return {
        m.name: {b.backend for v in m.versions if v.version == version for b in v.backends
                 if b.state == available}
        for m in listing.models
    }  # fmt: skip


@pytest.fixture
async def load(stack: Stack) -> AsyncIterator[Load]:
    """A client calling the gateway for this test alone (what it saw is no other test's), started
    once version 1 of both models is AVAILABLE on every backend it is placed on."""

    async def everywhere() -> bool:
        try:
            now = await placed(stack)
        except grpc.aio.AioRpcError:
            return False
        return all(now.get(m) == b for m, b in PLACED.items())

    await wait_for(everywhere, timeout=90, what="version 1 of both models on every backend")
    recorder = Load(stack.gateway.address)
    tasks = [
        asyncio.create_task(recorder.run("half_plus_two", "own")),
        asyncio.create_task(recorder.run("half_plus_two", "facade")),
        asyncio.create_task(recorder.run("half_plus_two_inf", "own")),
    ]
    yield recorder
    recorder.stop.set()
    await asyncio.gather(*tasks)


async def version_2(stack: Stack, load: Load, content: int | None) -> None:
    """Version 2 of half_plus_two answering, AVAILABLE on both cpu/gpu backends, and holding the
    files of example version ``content`` and only those (None: whatever it holds). Put there
    unless it is so already (the previous test in the file's order leaves it so)."""
    prefix = "models/half_plus_two/2/"
    listed = stack.s3.list_objects_v2(Bucket=stack.bucket, Prefix=prefix).get("Contents", [])
    there = {
        o["Key"][len(prefix) :]: stack.s3.get_object(Bucket=stack.bucket, Key=o["Key"])[
            "Body"
        ].read()
        for o in listed
    }
    files = files_of(stack.models / "half_plus_two" / str(content or 2))
    if there != files and (content is not None or not there):
        stack.delete(prefix)
        stack.put(prefix, files)
    await wait_for(
        lambda: any(r[1] == "half_plus_two" and r[2] == 2 for r in load.results),
        timeout=DEADLINE,
        what="version 2 answering",
    )

    async def on_both() -> bool:
        return (await placed(stack, 2)).get("half_plus_two") == PLACED["half_plus_two"]

    await wait_for(on_both, timeout=DEADLINE, what="version 2 AVAILABLE on gpu-0 and cpu-1")


@pytest.fixture
async def v2_added(stack: Stack, load: Load) -> None:
    """What test_1 leaves: version 2 added with its own content."""
    await version_2(stack, load, content=2)


@pytest.fixture
async def v2_rewritten(stack: Stack, load: Load) -> None:
    """What test_2 leaves: version 2 holding version 1's content."""
    await version_2(stack, load, content=1)


@pytest.fixture
async def v2_present(stack: Stack, load: Load) -> None:
    """Version 2 there, whatever its content (test_3 leaves it restructured)."""
    await version_2(stack, load, content=None)


async def published(stack: Stack) -> dict[str, dict[int, str]]:
    """model -> version -> servable name, as modelsync lists them now."""
    async with grpc.aio.insecure_channel(stack.sync.address) as channel:
        reply = await modelsync_pb2_grpc.ModelSyncStub(channel).ListModels(
            modelsync_pb2.ListModelsRequest(), timeout=5
        )
    return {
        m.name: {v.version: f"{m.name}@{Path(v.store_base_path).name}" for v in m.versions}
        for m in reply.models
    }


async def servable_state(backend: Proc, servable: str, version: int | None = None) -> int | None:
    """State of a servable's version (its first listed one by default) on a backend; None when
    the backend does not have it."""
    async with grpc.aio.insecure_channel(backend.address) as channel:
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = servable
        try:
            reply = await model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
                request, timeout=5
            )
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
            return None
        states = {s.version: int(s.state) for s in reply.model_version_status}
        if version is None:
            return next(iter(states.values()))
        return states.get(version)


async def trigger(load: Load, action: Any, model: str, version: int, y: list[float]) -> float:
    """Runs ``action`` and waits until the new content is served; returns seconds taken."""
    started = time.monotonic()
    action()
    await wait_for(
        lambda: load.served(model, version, y, started),
        timeout=DEADLINE,
        what=f"{model} v{version} {y}",
    )
    took = time.monotonic() - started
    print(f"propagation: {took:.2f} s")
    assert not load.failures(started), load.failures(started)[:5]
    return took


async def test_1_version_added(stack: Stack, load: Load) -> None:
    assert load.served("half_plus_two", 1, V1_Y, 0) or await wait_for(
        lambda: load.served("half_plus_two", 1, V1_Y, 0), timeout=10, what="v1"
    )
    v2 = files_of(stack.models / "half_plus_two" / "2")
    await trigger(load, lambda: stack.put("models/half_plus_two/2/", v2), "half_plus_two", 2, V2_Y)


async def test_2_latest_updated_in_place(stack: Stack, load: Load, v2_added: None) -> None:
    # Versions keep their first content in the servable named after the model (no renaming on the
    # request path); a rewritten version loads beside it as <model>@r<revision>.
    available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert await servable_state(stack.backends["gpu-0"], "half_plus_two", 2) == available
    v1_content = files_of(stack.models / "half_plus_two" / "1")
    await trigger(
        load, lambda: stack.put("models/half_plus_two/2/", v1_content), "half_plus_two", 2, V1_Y
    )
    rewritten = (await published(stack))["half_plus_two"][2]
    for name in ("gpu-0", "cpu-1"):
        backend = stack.backends[name]
        assert await servable_state(backend, rewritten, 2) == available

        async def unloaded(backend: Proc = backend) -> bool:
            # the old content is unloaded once routing moved away from it; version 1 stays
            state = await servable_state(backend, "half_plus_two", 2)
            return state in (None, get_model_status_pb2.ModelVersionStatus.END)

        await wait_for(unloaded, timeout=10, what=f"the old version 2 unloaded on {name}")
        assert await servable_state(backend, "half_plus_two", 1) == available


async def test_3_structure_changed(stack: Stack, load: Load, v2_rewritten: None) -> None:
    before = (await published(stack))["half_plus_two"][2]
    started = time.monotonic()
    stack.put("models/half_plus_two/2/", {"assets/notes.txt": b"structure change"})

    async def moved() -> bool:
        now = (await published(stack)).get("half_plus_two", {}).get(2)
        if now in (None, before):
            return False
        states = [await servable_state(stack.backends[n], now) for n in ("gpu-0", "cpu-1")]
        return all(s == get_model_status_pb2.ModelVersionStatus.AVAILABLE for s in states)

    await wait_for(moved, timeout=DEADLINE, what="the restructured version to load everywhere")
    mark = time.monotonic()
    await wait_for(
        lambda: load.served("half_plus_two", 2, V1_Y, mark),
        timeout=5,
        what="answers after the move",
    )
    assert not load.failures(started), load.failures(started)[:5]


async def test_4_version_removed(stack: Stack, load: Load, v2_present: None) -> None:
    await trigger(load, lambda: stack.delete("models/half_plus_two/2/"), "half_plus_two", 1, V1_Y)
    async with grpc.aio.insecure_channel(stack.gateway.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        request = own_request("half_plus_two")
        request.version = 2
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Predict(request, timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_5_placement_respected(stack: Stack, load: Load) -> None:
    inf, cpu = "half_plus_two_inf", "half_plus_two"  # version 1 of each never changed
    available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert await servable_state(stack.backends["inf-0"], inf) == available
    assert await servable_state(stack.backends["inf-0"], cpu) is None
    for name in ("gpu-0", "cpu-1"):
        assert await servable_state(stack.backends[name], cpu) == available
        assert await servable_state(stack.backends[name], inf) is None
    async with grpc.aio.insecure_channel(stack.gateway.address) as channel:
        listing = await models_pb2_grpc.ModelsStub(channel).ListModels(
            models_pb2.ListModelsRequest(), timeout=5
        )
    placed = {m.name: {b.backend for v in m.versions for b in v.backends} for m in listing.models}
    assert placed == {"half_plus_two": {"gpu-0", "cpu-1"}, "half_plus_two_inf": {"inf-0"}}
    assert not load.failures(), load.failures()[:5]


async def test_6_backend_killed_under_load_then_restarted(stack: Stack, load: Load) -> None:
    victim = stack.backends["gpu-0"]
    address = victim.address
    started = time.monotonic()
    victim.popen.kill()
    victim.stop()
    # calls keep flowing: the other cpu/gpu backend takes them (a call cut mid-way is retried there)
    mark = time.monotonic()
    await wait_for(
        lambda: load.served("half_plus_two", 1, V1_Y, mark), timeout=5, what="answers without gpu-0"
    )
    assert not load.failures(started), load.failures(started)[:5]
    stack.backends["gpu-0"] = start_daemon(
        ["backend", "--listen", address, "--accelerator", "gpu", "--poll-interval", "200ms"]
    )

    async def back_in_rotation() -> bool:
        async with grpc.aio.insecure_channel(stack.gateway.address) as channel:
            reply = await models_pb2_grpc.ModelsStub(channel).GetModel(
                models_pb2.GetModelRequest(name="half_plus_two"), timeout=5
            )
        available = models_pb2.VERSION_STATE_AVAILABLE
        return any(
            b.backend == "gpu-0" and b.state == available
            for v in reply.model.versions
            for b in v.backends
        )

    await wait_for(back_in_rotation, timeout=60, what="gpu-0 reconfigured after its restart")
    assert not load.failures(started), load.failures(started)[:5]


async def test_7_every_backend_down_fails_fast(stack: Stack, load: Load) -> None:
    load.stop.set()
    for name in ("gpu-0", "cpu-1"):
        stack.backends[name].popen.kill()
        stack.backends[name].stop()
    async with grpc.aio.insecure_channel(stack.gateway.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Predict(own_request("half_plus_two"), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
            assert time.monotonic() - started < 2
        # the other model, on its own backend, is unaffected
        assert (await stub.Predict(own_request("half_plus_two_inf"), timeout=10)).version == 1


async def test_8_modelsync_away_then_back(stack: Stack) -> None:
    """The gateway keeps serving while modelsync is down, says so in health, and resumes."""
    from gateway_helpers import health_status
    from grpc_health.v1 import health_pb2

    address = stack.sync.address
    stack.sync.stop()
    link = "modelmux.modelsync.v1.ModelSync"

    async def link_is(status: int) -> bool:
        return await health_status(stack.gateway.address, link) == status

    await wait_for(
        lambda: link_is(health_pb2.HealthCheckResponse.NOT_SERVING), timeout=10, what="link down"
    )
    async with grpc.aio.insecure_channel(stack.gateway.address) as channel:
        reply = await inference_pb2_grpc.InferenceStub(channel).Predict(
            own_request("half_plus_two_inf"), timeout=10
        )
        assert reply.version == 1  # still serving what it had
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    stack.sync = start_daemon(["sync", "--config", str(stack.config), "--listen", address], env=env)
    await wait_for(
        lambda: link_is(health_pb2.HealthCheckResponse.SERVING), timeout=30, what="link back"
    )
