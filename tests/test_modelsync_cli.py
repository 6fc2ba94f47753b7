"""``modelmux sync`` as a real process: grpcurl, --once, SIGTERM, SIGKILL during a download."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from asyncio.subprocess import PIPE
from collections.abc import Iterator
from pathlib import Path

import pytest
from modelsync_helpers import (
    AWS_ENV,
    ROOT,
    MotoServer,
    StallingProxy,
    SyncProcess,
    api,
    cpu_model,
    free_port,
    inf_model,
    moto_for_module,
    new_bucket,
    object_gets,
    prefixed,
    put_tree,
    tree,
    wait_until,
    write_config,
    write_tree,
)

GRPCURL = str(Path(sys.executable).with_name("grpcurl"))
SERVICE = "modelmux.modelsync.v1.ModelSync"
MIB = 1024 * 1024
ONCE = [sys.executable, "-m", "modelmux_common.cli", "sync", "--config"]


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    yield from moto_for_module(tmp_path_factory)


def sync_once(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ONCE, str(config), "--once"],
        env={**os.environ, **AWS_ENV, "MODELMUX_LOG_FORMAT": "json"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def log_events(stderr: str) -> list[dict[str, object]]:
    out = []
    for line in stderr.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


async def read_until(stream: asyncio.StreamReader, marker: str, timeout: float = 15.0) -> str:
    """Reads lines until one contains ``marker``; returns what was read."""
    text = ""
    while marker not in text:
        line = await asyncio.wait_for(stream.readline(), timeout)
        if not line:
            raise AssertionError(f"stream ended before {marker!r}: {text}")
        text += line.decode()
    return text


def published(proc: SyncProcess, model: str, version: int) -> bool:
    return proc.logged("published", model=model, version=version) is not None


def test_once_mirrors_and_exits(tmp_path: Path) -> None:
    source = tmp_path / "models"
    write_tree(source / "m" / "1", inf_model("one"))
    config, loaded = write_config(tmp_path, [api("d", {"dir": str(source)})])
    done = sync_once(config)
    assert done.returncode == 0, done.stderr
    assert tree(Path(loaded.modelsync.target)) == prefixed("m/1/", inf_model("one"))
    assert not any(e.get("event") == "serving" for e in log_events(done.stderr))

    down = tmp_path / "down"
    down.mkdir()
    config, _ = write_config(
        down,
        [api("m", {"path": "s3://nowhere/m/"})],
        s3_endpoint_url=f"http://127.0.0.1:{free_port()}",
        s3_max_attempts=1,
    )
    failed = sync_once(config)
    assert failed.returncode == 1, failed.stderr
    assert any(e.get("event") == "source_failed" for e in log_events(failed.stderr))


async def test_grpcurl_lists_the_service_and_watches_snapshot_then_live(tmp_path: Path) -> None:
    source = tmp_path / "models"
    write_tree(source / "a" / "1", inf_model("a1"))
    config, _ = write_config(tmp_path, [api("d", {"dir": str(source)})])
    proc = SyncProcess(["sync", "--config", str(config)])
    try:
        address = await proc.serving()
        listed = await asyncio.create_subprocess_exec(
            GRPCURL, "-plaintext", "-max-time", "10", address, "list", stdout=PIPE
        )
        out, _ = await asyncio.wait_for(listed.communicate(), 20)
        assert SERVICE in out.decode().split(), out
        await wait_until(lambda: published(proc, "a", 1), what="a/1 published")
        watch = await asyncio.create_subprocess_exec(
            GRPCURL, "-plaintext", "-max-time", "20", "-d", "{}", address,
            f"{SERVICE}/WatchEvents", stdout=PIPE,
        )  # fmt: skip
        assert watch.stdout is not None
        try:
            head = await read_until(watch.stdout, "SNAPSHOT_REASON_INITIAL")
            write_tree(source / "b" / "2", inf_model("b2"))
            text = head + await read_until(watch.stdout, '"model": "b"')
        finally:
            watch.terminate()
            await asyncio.wait_for(watch.communicate(), 10)
        assert text.index('"snapshot"') < text.index('"event"') < text.index('"model": "b"')
        assert "EVENT_KIND_VERSION_ADDED" in text[text.index('"event"') :]
    finally:
        assert proc.finish() == 0  # SIGTERM: a clean stop
    assert proc.logged("stopped")


async def test_kill_during_a_large_download_leaves_the_tree_intact(
    tmp_path: Path, moto: MotoServer
) -> None:
    proxy = await StallingProxy(moto.port).start()
    try:
        await _kill_and_restart(tmp_path, moto, proxy)
    finally:
        await proxy.close()


def staged_bytes(target: Path) -> int:
    return sum(p.stat().st_size for p in (target / ".staging").rglob("*") if p.is_file())


async def _kill_and_restart(tmp_path: Path, moto: MotoServer, proxy: StallingProxy) -> None:
    bucket = new_bucket(moto)
    s3 = moto.client()
    put_tree(s3, bucket, "m/1/", cpu_model("one"))
    config, loaded = write_config(
        tmp_path, [api("m", {"path": f"s3://{bucket}/m/"})], s3_endpoint_url=proxy.endpoint
    )
    target = Path(loaded.modelsync.target)
    args = ["sync", "--config", str(config)]
    proc = SyncProcess(args, env=AWS_ENV)
    try:
        await wait_until(lambda: published(proc, "m", 1), what="m/1 published")
        before = tree(target)
        big = os.urandom(40 * MIB)
        proxy.stall(after_bytes=8 * MIB)  # the kill must land mid-transfer
        put_tree(s3, bucket, "m/2/", cpu_model("two", data=big))
        await wait_until(lambda: staged_bytes(target) >= 4 * MIB, timeout=30, what="a partial file")
        # A long transfer reports its progress (every progress_interval, 0.5 s here).
        progress = await wait_until(lambda: proc.logged("transfer_progress", model="m", version=2))
        assert 0 < progress["bytes_done"] < progress["bytes_total"]
    finally:
        assert proc.finish(signal.SIGKILL) == -signal.SIGKILL
    assert tree(target) == before  # nothing half-done reached the view
    assert sorted(p.name for p in (target / ".store" / "m").iterdir()) == ["r1"]
    assert staged_bytes(target) > 0  # litter that only the next start clears

    proxy.release()
    mark = moto.settle(bucket)
    proc = SyncProcess(args, env=AWS_ENV)
    try:
        await wait_until(lambda: published(proc, "m", 2), timeout=60, what="m/2 published")
        assert proc.logged("state_loaded", staging_litter_removed=1)
        line = proc.logged("published", model="m", version=2)
        assert line is not None and line["files"] == 3 and line["seconds"] > 0
        assert line["bytes"] == sum(len(v) for v in cpu_model("two", data=big).values())
    finally:
        assert proc.finish() == 0
    assert tree(target) == before | prefixed("m/2/", cpu_model("two", data=big))
    assert list((target / ".staging").iterdir()) == []
    assert len(list((target / ".store" / "m").iterdir())) == 2
    gets = object_gets(moto.requests()[mark : moto.settle(bucket)], bucket)
    assert sorted(gets) == sorted(f"/{bucket}/m/2/{name}" for name in cpu_model("two"))


def test_cli_flags_override_the_config(tmp_path: Path) -> None:
    source = tmp_path / "models"
    write_tree(source / "m" / "1", inf_model("one"))
    config, loaded = write_config(tmp_path, [api("d", {"dir": str(source)})])
    elsewhere = tmp_path / "elsewhere"
    done = subprocess.run(
        [*ONCE, str(config), "--once", "--target", str(elsewhere)],
        env={**os.environ, "MODELMUX_LOG_FORMAT": "json"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert tree(elsewhere) == prefixed("m/1/", inf_model("one"))
    assert not Path(loaded.modelsync.target).exists()


def test_modelsync_never_imports_tensorflow() -> None:
    code = (
        "import sys, modelsync.daemon, modelsync.service, modelsync.syncer, modelsync.s3\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_serving'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
