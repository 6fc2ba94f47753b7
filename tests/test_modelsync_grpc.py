"""The ModelSync gRPC API in-process: snapshot, live events, resumption by revision, health."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from modelsync_helpers import api, inf_model, running, wait_event, write_config, write_tree

from modelmux.modelsync.v1 import modelsync_pb2 as pb
from modelmux.modelsync.v1 import modelsync_pb2_grpc as pb_grpc
from modelmux_common.config import Config
from modelsync.daemon import Daemon
from modelsync.events import EventKind

Stream = grpc.aio.UnaryStreamCall[pb.WatchEventsRequest, pb.WatchEventsResponse]


async def next_item(stream: Stream) -> pb.WatchEventsResponse:
    item = await asyncio.wait_for(stream.read(), 10)
    assert isinstance(item, pb.WatchEventsResponse), item
    return item


def models_dir(tmp_path: Path, **settings: object) -> tuple[Path, Config]:
    """A dir source holding model a, version 1, and a config for it."""
    source = tmp_path / "models"
    write_tree(source / "a" / "1", inf_model("a1"))
    _, config = write_config(tmp_path, [api("d", {"dir": str(source)})], **settings)
    return source, config


async def test_snapshot_then_live_events(tmp_path: Path) -> None:
    source, config = models_dir(tmp_path)
    async with running(config) as daemon:
        added = await wait_event(daemon, EventKind.VERSION_ADDED, model="a", version=1)
        async with grpc.aio.insecure_channel(daemon.address) as channel:
            stub = pb_grpc.ModelSyncStub(channel)
            call = stub.WatchEvents(pb.WatchEventsRequest(from_revision=0), timeout=20)
            first = await next_item(call)
            assert first.WhichOneof("item") == "snapshot"
            snap = first.snapshot
            assert snap.reason == pb.SNAPSHOT_REASON_INITIAL
            assert snap.revision == daemon.syncer.events.revision >= added.revision
            assert [m.name for m in snap.models] == ["a"]
            assert snap.models[0].versions[0].store_path == added.store_path
            assert [s.id for s in snap.sources] == ["d/*"]

            write_tree(source / "b" / "4", inf_model("b4"))
            live = await next_item(call)
            assert live.WhichOneof("item") == "event" and not live.replayed
            assert live.event.kind == pb.EVENT_KIND_VERSION_ADDED
            assert (live.event.model, live.event.version) == ("b", 4)
            assert live.event.revision == snap.revision + 1
            assert live.event.store_base_path.endswith(f"/.store/b/r{live.event.revision}")
            call.cancel()


async def test_resume_replays_after_a_revision_then_goes_live(tmp_path: Path) -> None:
    source, config = models_dir(tmp_path, event_log_size=2)
    async with running(config) as daemon:
        await wait_event(daemon, EventKind.VERSION_ADDED, model="a", version=1)
        seen = daemon.syncer.events.revision
        write_tree(source / "b" / "1", inf_model("b1"))
        write_tree(source / "c" / "1", inf_model("c1"))
        await wait_event(daemon, EventKind.VERSION_ADDED, model="b", version=1)
        await wait_event(daemon, EventKind.VERSION_ADDED, model="c", version=1)
        async with grpc.aio.insecure_channel(daemon.address) as channel:
            stub = pb_grpc.ModelSyncStub(channel)
            call = stub.WatchEvents(pb.WatchEventsRequest(from_revision=seen), timeout=20)
            replayed = [await next_item(call), await next_item(call)]
            assert all(r.replayed and r.WhichOneof("item") == "event" for r in replayed)
            assert sorted(r.event.model for r in replayed) == ["b", "c"]
            assert [r.event.revision for r in replayed] == [seen + 1, seen + 2]
            write_tree(source / "d" / "1", inf_model("d1"))
            live = await next_item(call)
            assert not live.replayed and live.event.model == "d"
            assert live.event.revision == seen + 3
            call.cancel()

            # No longer retained (the log keeps 2 events): a fresh snapshot, and it says so.
            old = stub.WatchEvents(pb.WatchEventsRequest(from_revision=seen), timeout=20)
            snap = (await next_item(old)).snapshot
            assert snap.reason == pb.SNAPSHOT_REASON_REVISION_EXPIRED
            assert sorted(m.name for m in snap.models) == ["a", "b", "c", "d"]
            old.cancel()
            ahead = stub.WatchEvents(pb.WatchEventsRequest(from_revision=10_000), timeout=20)
            assert (await next_item(ahead)).snapshot.reason == pb.SNAPSHOT_REASON_REVISION_UNKNOWN
            ahead.cancel()

            bad = stub.WatchEvents(pb.WatchEventsRequest(from_revision=-1), timeout=20)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await next_item(bad)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_health_and_shutdown_end_streams_with_a_resume_hint(tmp_path: Path) -> None:
    _, config = models_dir(tmp_path)
    daemon = Daemon(config, config.modelsync)
    await daemon.start()
    try:
        await wait_event(daemon, EventKind.VERSION_ADDED, model="a", version=1)
        async with grpc.aio.insecure_channel(daemon.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "modelmux.modelsync.v1.ModelSync", "source/d/*"):
                reply = await health.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=5
                )
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
            stub = pb_grpc.ModelSyncStub(channel)
            call = stub.WatchEvents(pb.WatchEventsRequest(), timeout=20)
            await next_item(call)
            await daemon.stop()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await next_item(call)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "resume from revision" in (err.value.details() or "")
    finally:
        await daemon.stop()
