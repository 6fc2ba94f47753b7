"""Version labels, traffic split and the WatchModels stream, on a real gateway and backend."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import Proc
from gateway_helpers import start_gateway, write_config

from gateway.server import Gateway
from modelmux.v1 import inference_pb2, inference_pb2_grpc, models_pb2, models_pb2_grpc, tensor_pb2

TOKEN = "s3cret-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture(scope="module")
async def gateway(
    tmp_path_factory: pytest.TempPathFactory, example_models: Path, backend: Proc
) -> AsyncIterator[Gateway]:
    cfg = write_config(
        tmp_path_factory.mktemp("admin") / "modelmux.yaml",
        models=example_models,
        backends=[{"name": "cpu-0", "address": backend.address}],
        gateway={"admin_token": TOKEN, "log_requests": False},
    )
    gw = await start_gateway(cfg)
    yield gw
    await gw.stop()


@pytest.fixture
async def channel(gateway: Gateway) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(gateway.address) as ch:
        yield ch


def call(**spec: object) -> inference_pb2.PredictRequest:
    x = tensor_pb2.Tensor(
        dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[1], content=np.ones(1, "<f4").tobytes()
    )
    return inference_pb2.PredictRequest(model="half_plus_two", inputs={"x": x}, **spec)  # type: ignore[arg-type]


async def test_admin_calls_need_the_token(channel: grpc.aio.Channel) -> None:
    stub = models_pb2_grpc.ModelsStub(channel)
    request = models_pb2.SetVersionLabelRequest(model="half_plus_two", label="stable", version=2)
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.SetVersionLabel(request)
    assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as wrong:
        await stub.SetVersionLabel(request, metadata=(("authorization", "Bearer nope"),))
    assert wrong.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await stub.SetVersionLabel(
            models_pb2.SetVersionLabelRequest(model="half_plus_two", label="x", version=9),
            metadata=AUTH,
        )
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND and "version 9" in (
        unknown.value.details() or ""
    )


async def test_label_moves_and_watchers_see_it(channel: grpc.aio.Channel) -> None:
    models = models_pb2_grpc.ModelsStub(channel)
    infer = inference_pb2_grpc.InferenceStub(channel)
    watch = models.WatchModels(models_pb2.WatchModelsRequest(models=["half_plus_two"]))
    first = await asyncio.wait_for(watch.read(), 10)
    assert first.model.name == "half_plus_two" and first.model.labels["stable"] == 1
    assert (await infer.Predict(call(version_label="stable"))).version == 1
    reply = await models.SetVersionLabel(
        models_pb2.SetVersionLabelRequest(model="half_plus_two", label="stable", version=2),
        metadata=AUTH,
    )
    assert reply.model.labels["stable"] == 2 and not reply.model.pending_labels
    change = await asyncio.wait_for(watch.read(), 10)
    assert change.model.labels["stable"] == 2 and not change.removed
    assert (await infer.Predict(call(version_label="stable"))).version == 2
    await models.SetVersionLabel(
        models_pb2.SetVersionLabelRequest(model="half_plus_two", label="stable", version=0),
        metadata=AUTH,
    )
    gone = await asyncio.wait_for(watch.read(), 10)
    assert "stable" not in gone.model.labels
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await infer.Predict(call(version_label="stable"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    watch.cancel()


async def test_traffic_split_between_versions(channel: grpc.aio.Channel) -> None:
    models = models_pb2_grpc.ModelsStub(channel)
    infer = inference_pb2_grpc.InferenceStub(channel)
    split = models_pb2.SetTrafficSplitRequest(model="half_plus_two", weights={1: 1, 2: 1})
    reply = await models.SetTrafficSplit(split, metadata=AUTH)
    assert dict(reply.model.traffic_split) == {1: 1, 2: 1}
    seen = Counter([(await infer.Predict(call())).version for _ in range(200)])
    assert seen[1] > 40 and seen[2] > 40, seen
    assert {(await infer.Predict(call(version=2))).version for _ in range(20)} == {
        2
    }  # explicit: unaffected
    with pytest.raises(grpc.aio.AioRpcError) as zero:
        await models.SetTrafficSplit(
            models_pb2.SetTrafficSplitRequest(model="half_plus_two", weights={1: 0}), metadata=AUTH
        )
    assert zero.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await models.SetTrafficSplit(
        models_pb2.SetTrafficSplitRequest(model="half_plus_two"), metadata=AUTH
    )
    assert {(await infer.Predict(call())).version for _ in range(20)} == {2}
