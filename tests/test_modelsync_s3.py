"""modelsync against a real S3 endpoint over HTTP (moto's server mode on loopback), in-process."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from modelsync_helpers import (
    MotoServer,
    StallingProxy,
    api,
    aws_env,
    cpu_model,
    delete_prefix,
    events,
    inf_model,
    moto_for_module,
    new_bucket,
    object_gets,
    prefixed,
    put_tree,
    running,
    ticks_pass,
    tree,
    unique_bucket,
    wait_event,
    wait_until,
    write_config,
)

from modelmux.modelsync.v1 import modelsync_pb2, modelsync_pb2_grpc
from modelsync.daemon import Daemon, health_name
from modelsync.events import EventKind


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    yield from moto_for_module(tmp_path_factory)


@pytest.fixture
def bucket(moto: MotoServer) -> str:
    return new_bucket(moto)


def expected(prefix: str, files: dict[str, bytes]) -> dict[str, bytes]:
    return prefixed(prefix, files)


async def source_health(daemon: Daemon, service: str) -> int:
    async with grpc.aio.insecure_channel(daemon.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(reply.status)


async def test_initial_mirror_of_path_paths_and_dir_sources(
    tmp_path: Path, moto: MotoServer, bucket: str
) -> None:
    s3 = moto.client()
    put_tree(s3, bucket, "single/1/", cpu_model("s1"))
    put_tree(s3, bucket, "single/2/", cpu_model("s2"))
    put_tree(s3, bucket, "paths/x/5/", cpu_model("x5"))
    put_tree(s3, bucket, "paths/y/", cpu_model("y"))  # unversioned: version 1
    put_tree(s3, bucket, "dir/a/3/", cpu_model("a3"))
    put_tree(s3, bucket, "dir/a/10/", cpu_model("a10"))
    put_tree(s3, bucket, "dir/b/", {"saved_model.pb": b"graph b"})  # no variables at all
    bad = {k: v for k, v in cpu_model("bad").items() if not k.endswith("index")}
    put_tree(s3, bucket, "dir/broken/1/", bad)
    put_tree(s3, bucket, "neuron/1/", inf_model("n1"))
    put_tree(s3, bucket, "neuron/2/", cpu_model("n2"))  # variables/ on Inferentia: refused
    apis = [
        api("single", {"path": f"s3://{bucket}/single"}),
        api(
            "multi",
            {
                "paths": [
                    {"name": "x", "path": f"s3://{bucket}/paths/x/"},
                    {"name": "y", "path": f"s3://{bucket}/paths/y/"},
                ]
            },
        ),
        api("fleet", {"dir": f"s3://{bucket}/dir/"}),
        api("neuron", {"path": f"s3://{bucket}/neuron/"}, inf=True),
    ]
    _, config = write_config(tmp_path, apis, s3_endpoint_url=moto.endpoint)
    target = Path(config.modelsync.target)
    async with running(config) as daemon:
        wanted = {("single", 1), ("single", 2), ("x", 5), ("y", 1), ("a", 3), ("a", 10)}
        wanted |= {("b", 1), ("neuron", 1)}

        def published() -> bool:
            got = {
                (e.model, e.version) for e in events(daemon) if e.kind is EventKind.VERSION_ADDED
            }
            return got == wanted

        await wait_until(published, what="every valid version published")
        broken = await wait_event(daemon, EventKind.VALIDATION_FAILED, model="broken", version=1)
        assert "variables.index" in broken.reason
        neuron2 = await wait_event(daemon, EventKind.VALIDATION_FAILED, model="neuron", version=2)
        assert "Inferentia layout" in neuron2.reason and neuron2.inferentia

        want = expected("single/1/", cpu_model("s1")) | expected("single/2/", cpu_model("s2"))
        want |= expected("x/5/", cpu_model("x5")) | expected("y/1/", cpu_model("y"))
        want |= expected("a/3/", cpu_model("a3")) | expected("a/10/", cpu_model("a10"))
        want |= {"b/1/saved_model.pb": b"graph b"} | expected("neuron/1/", inf_model("n1"))
        assert tree(target) == want
        assert os.readlink(target / "a" / "10") == f"../.store/a/{_rev(daemon, 'a', 10)}/10"

        added = {
            (e.model, e.version): e for e in events(daemon) if e.kind is EventKind.VERSION_ADDED
        }
        n1 = added[("neuron", 1)]
        assert n1.inferentia and n1.api == "neuron" and n1.source == f"s3://{bucket}/neuron/"
        assert (
            Path(n1.store_path).is_dir() and Path(n1.store_base_path) == Path(n1.store_path).parent
        )
        assert sorted(p.name for p in Path(n1.store_base_path).iterdir()) == ["1"]
        revisions = [e.revision for e in events(daemon)]
        assert revisions == sorted(set(revisions))

        async with grpc.aio.insecure_channel(daemon.address) as channel:
            stub = modelsync_pb2_grpc.ModelSyncStub(channel)
            listing = await stub.ListModels(modelsync_pb2.ListModelsRequest(), timeout=5)
        models = {m.name: m for m in listing.models}
        assert sorted(models) == ["a", "b", "neuron", "single", "x", "y"]
        assert [v.version for v in models["a"].versions] == [3, 10]
        a10 = models["a"].versions[1]
        assert a10.digest == added[("a", 10)].digest and a10.revision == added[("a", 10)].revision
        assert a10.store_path == added[("a", 10)].store_path
        assert a10.view_path == str(target / "a" / "10") and models["a"].api == "fleet"
        assert all(s.healthy for s in listing.sources) and len(listing.sources) == 5


def _rev(daemon: Daemon, model: str, version: int) -> str:
    return f"r{daemon.syncer.publisher.published[(model, version)].revision}"


async def test_four_triggers_and_an_unchanged_tick(
    tmp_path: Path, moto: MotoServer, bucket: str
) -> None:
    s3 = moto.client()
    put_tree(s3, bucket, "m/1/", cpu_model("one"))
    _, config = write_config(
        tmp_path, [api("m", {"path": f"s3://{bucket}/m/"})], s3_endpoint_url=moto.endpoint
    )
    target = Path(config.modelsync.target)
    async with running(config) as daemon:
        first = await wait_event(daemon, EventKind.VERSION_ADDED, model="m", version=1)

        # An unchanged tick lists and downloads nothing.
        before = moto.settle(bucket)
        await ticks_pass(daemon, 3)
        after = moto.settle(bucket)
        during = [r for r in moto.requests()[before:after] if f"/{bucket}" in r.path]
        # the first of the three ticks may have listed just before `before`: at least two lists
        assert len(during) >= 2 and all(r.is_list for r in during), during

        # 1. A version added.
        put_tree(s3, bucket, "m/2/", cpu_model("two"))
        v2 = await wait_event(daemon, EventKind.VERSION_ADDED, model="m", version=2)
        assert tree(target)["m/2/variables/variables.index"] == b"index two"

        # 2. Folder structure changed: only the new file is downloaded.
        mark = moto.settle(bucket)
        s3.put_object(Bucket=bucket, Key="m/1/assets/vocab.txt", Body=b"words")
        changed = await wait_event(daemon, EventKind.STRUCTURE_CHANGED, model="m", version=1)
        assert "assets/vocab.txt" in changed.reason and changed.revision > v2.revision
        assert changed.previous_store_path == first.store_path
        assert changed.store_path != first.store_path and changed.digest != first.digest
        assert tree(target)["m/1/assets/vocab.txt"] == b"words"
        gets = object_gets(moto.requests()[mark : moto.settle(bucket)], bucket)
        assert gets == [f"/{bucket}/m/1/assets/vocab.txt"]

        # 3. A file rewritten in place: a new store folder, only that file downloaded.
        mark = moto.settle(bucket)
        s3.put_object(Bucket=bucket, Key="m/1/variables/variables.data-00000-of-00001", Body=b"new")
        updated = await wait_event(daemon, EventKind.CONTENT_UPDATED, model="m", version=1)
        assert "variables.data-00000-of-00001" in updated.reason
        assert updated.previous_store_path == changed.store_path
        assert tree(target)["m/1/variables/variables.data-00000-of-00001"] == b"new"
        # The content a backend may have loaded is untouched until the grace period ends.
        assert (
            Path(changed.store_path) / "variables/variables.data-00000-of-00001"
        ).read_bytes() == b"weights one"
        gets = object_gets(moto.requests()[mark : moto.settle(bucket)], bucket)
        assert gets == [f"/{bucket}/m/1/variables/variables.data-00000-of-00001"]
        await wait_until(lambda: not Path(changed.store_base_path).exists(), what="grace cleanup")
        assert not Path(first.store_base_path).exists()

        # 4. A version removed: announced at once, still served for the grace period, then gone.
        delete_prefix(s3, bucket, "m/2/")
        removed = await wait_event(daemon, EventKind.VERSION_REMOVED, model="m", version=2)
        assert removed.store_path == v2.store_path
        assert ("m", 2) not in daemon.syncer.publisher.published
        assert (target / "m" / "2" / "saved_model.pb").read_bytes() == b"graph two"
        await wait_until(lambda: not (target / "m" / "2").is_symlink(), what="view cleanup")
        # the store folder is deleted by a background thread right after the view goes
        await wait_until(lambda: not Path(v2.store_base_path).exists(), what="store cleanup")

        # ... and the model removed.
        delete_prefix(s3, bucket, "m/")
        gone = await wait_event(daemon, EventKind.MODEL_REMOVED, model="m")
        assert gone.revision == removed.revision + 2
        await wait_until(lambda: not (target / "m").exists(), what="model folder cleanup")
        revisions = [e.revision for e in events(daemon)]
        assert revisions == list(range(1, len(revisions) + 1))


async def test_hostile_keys_are_refused_and_reported_once(
    tmp_path: Path, moto: MotoServer, bucket: str
) -> None:
    s3 = moto.client()
    put_tree(s3, bucket, "d/good/1/", inf_model("good"))
    put_tree(s3, bucket, "d/evil/1/", inf_model("evil"))
    hostile = [
        "d/evil/1/../../../../escape.txt",
        "d/../outside/1/saved_model.pb",
        "d/bad name!/1/saved_model.pb",
        "d/back\\slash/1/saved_model.pb",
        "d//abs/1/saved_model.pb",
    ]
    for key in hostile:
        s3.put_object(Bucket=bucket, Key=key, Body=b"gotcha")
    _, config = write_config(
        tmp_path, [api("d", {"dir": f"s3://{bucket}/d/"}, inf=True)], s3_endpoint_url=moto.endpoint
    )
    target = Path(config.modelsync.target)
    async with running(config) as daemon:
        await wait_event(daemon, EventKind.VERSION_ADDED, model="good", version=1)
        evil = await wait_event(daemon, EventKind.VALIDATION_FAILED, model="evil", version=1)
        assert "escape.txt" in evil.reason and "'..'" in evil.reason
        await ticks_pass(daemon, 3)
        refused = [e for e in events(daemon) if e.kind is EventKind.VALIDATION_FAILED]
        reasons = " | ".join(e.reason for e in refused)
        for name in ("'..'", "'bad name!'", "'back\\\\slash", "''"):
            assert name in reasons, (name, reasons)
        # Reported once, not on every tick.
        assert len(refused) == 5, reasons
        assert sorted(p.name for p in target.iterdir()) == [
            ".modelsync",
            ".staging",
            ".store",
            "good",
        ]
        assert not [p for p in tmp_path.rglob("*") if p.name in ("escape.txt", "outside")]
        assert ("evil", 1) not in daemon.syncer.publisher.published


async def test_restart_downloads_nothing_unchanged(
    tmp_path: Path, moto: MotoServer, bucket: str
) -> None:
    s3 = moto.client()
    put_tree(s3, bucket, "m/1/", cpu_model("one"))
    put_tree(s3, bucket, "m/2/", cpu_model("two"))
    _, config = write_config(
        tmp_path, [api("m", {"path": f"s3://{bucket}/m/"})], s3_endpoint_url=moto.endpoint
    )
    target = Path(config.modelsync.target)
    async with running(config) as daemon:
        await wait_event(daemon, EventKind.VERSION_ADDED, model="m", version=2)
        await wait_event(daemon, EventKind.VERSION_ADDED, model="m", version=1)
        last = daemon.syncer.events.revision
    before = tree(target)
    put_tree(s3, bucket, "m/3/", inf_model("three"))  # lands while modelsync is down
    mark = moto.settle(bucket)
    async with running(config) as daemon:
        assert daemon.syncer.events.revision == last
        v3 = await wait_event(daemon, EventKind.VERSION_ADDED, model="m", version=3)
        await ticks_pass(daemon, 2)
        assert v3.revision == last + 1
        assert [e.kind for e in events(daemon, after=last)] == [EventKind.VERSION_ADDED]
    gets = object_gets(moto.requests()[mark : moto.settle(bucket)], bucket)
    assert gets == [f"/{bucket}/m/3/saved_model.pb"]
    assert tree(target) == before | {"m/3/saved_model.pb": b"neuron graph three"}


async def test_s3_going_away_and_coming_back(tmp_path: Path) -> None:
    with aws_env():
        moto = MotoServer(tmp_path).start()
        try:
            await _away_and_back(tmp_path, moto)
        finally:
            moto.stop()


async def _away_and_back(tmp_path: Path, moto: MotoServer) -> None:
    bucket = unique_bucket()

    def seed(s3: Any) -> None:
        s3.create_bucket(Bucket=bucket)
        put_tree(s3, bucket, "m/1/", cpu_model("one"))

    seed(moto.client())
    _, config = write_config(
        tmp_path,
        [api("m", {"path": f"s3://{bucket}/m/"})],
        s3_endpoint_url=moto.endpoint,
        s3_max_attempts=1,
        stall_timeout="2s",
    )
    target = Path(config.modelsync.target)
    async with running(config) as daemon:
        spec = daemon.syncer.specs[0]
        await wait_event(daemon, EventKind.VERSION_ADDED, model="m", version=1)
        await wait_until(lambda: daemon.syncer.runners[0].health.healthy, what="healthy source")
        assert (
            await source_health(daemon, health_name(spec)) == health_pb2.HealthCheckResponse.SERVING
        )
        before = tree(target)

        moto.stop()
        err = await wait_event(daemon, EventKind.SOURCE_ERROR)
        assert err.source == f"s3://{bucket}/m/" and "cannot list" in err.reason
        await ticks_pass(daemon, 3)
        assert [e.kind for e in events(daemon, after=err.revision)] == []  # reported once
        assert tree(target) == before  # the last good mirror stays
        assert (
            await source_health(daemon, health_name(spec))
            == health_pb2.HealthCheckResponse.NOT_SERVING
        )
        assert await source_health(daemon, "") == health_pb2.HealthCheckResponse.SERVING

        moto.start()  # same port, empty: the bucket comes back with one more version
        seed(moto.client())
        put_tree(moto.client(), bucket, "m/2/", inf_model("two"))
        mark = moto.settle(bucket)
        back = await wait_event(daemon, EventKind.SOURCE_RECOVERED, after=err.revision)
        await wait_event(daemon, EventKind.VERSION_ADDED, model="m", version=2, after=err.revision)
        assert back.revision > err.revision
        assert (
            await source_health(daemon, health_name(spec)) == health_pb2.HealthCheckResponse.SERVING
        )
        gets = object_gets(moto.requests()[mark : moto.settle(bucket)], bucket)
        assert gets == [f"/{bucket}/m/2/saved_model.pb"]  # version 1 was not downloaded again


async def test_stalled_transfer_is_retried_and_resumed(
    tmp_path: Path, moto: MotoServer, bucket: str
) -> None:
    proxy = await StallingProxy(moto.port).start()
    try:
        weights = os.urandom(6 * 1024 * 1024)
        put_tree(moto.client(), bucket, "m/1/", cpu_model("big", data=weights))
        proxy.stall(after_bytes=1024 * 1024)
        _, config = write_config(
            tmp_path,
            [api("m", {"path": f"s3://{bucket}/m/"})],
            s3_endpoint_url=proxy.endpoint,
            stall_timeout="0.5s",
            download_attempts=8,
        )
        async with running(config) as daemon:
            transfers = daemon.syncer.transfers
            await wait_until(lambda: transfers.retries >= 1, what="a stalled transfer retried")
            assert not events(daemon)  # nothing half-done was published
            proxy.release()
            await wait_event(daemon, EventKind.VERSION_ADDED, model="m", version=1, timeout=20)
            data = Path(config.modelsync.target) / "m/1/variables/variables.data-00000-of-00001"
            assert data.read_bytes() == weights
            # Each retry continued the partial file: no byte was received twice.
            assert transfers.bytes_received == sum(
                len(v) for v in cpu_model("big", data=weights).values()
            )
    finally:
        await proxy.close()


async def test_an_upload_in_progress_settles_before_it_is_judged(
    tmp_path: Path, moto: MotoServer, bucket: str
) -> None:
    s3 = moto.client()
    _, config = write_config(
        tmp_path,
        [api("m", {"path": f"s3://{bucket}/m/"})],
        s3_endpoint_url=moto.endpoint,
        settle="2s",
    )
    files = cpu_model("one")
    async with running(config) as daemon:
        # File by file: first valid but incomplete (a graph alone), then invalid (data, no index).
        for name in ("saved_model.pb", "variables/variables.data-00000-of-00001"):
            put_tree(s3, bucket, "m/1/", {name: files[name]})
            await ticks_pass(daemon, 1)
            assert events(daemon) == []
            assert daemon.syncer.runners[0].settle_wait is not None
        put_tree(
            s3, bucket, "m/1/", {"variables/variables.index": files["variables/variables.index"]}
        )
        added = await wait_event(daemon, EventKind.VERSION_ADDED, model="m", version=1)
        assert added.files == 3
        assert [e.kind for e in events(daemon)] == [EventKind.VERSION_ADDED]
