"""modelsync on local folders: watchdog-driven triggers, debouncing, the rescan fallback."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from modelsync_helpers import (
    api,
    cpu_model,
    events,
    inf_model,
    prefixed,
    running,
    tree,
    wait_event,
    wait_until,
    write_config,
    write_tree,
)

from modelsync.events import EventKind


async def test_watched_folder_triggers(tmp_path: Path) -> None:
    source = tmp_path / "models" / "m"
    write_tree(source / "1", cpu_model("one"))
    # A poll interval far beyond the test: only the watch can explain a prompt reaction.
    _, config = write_config(tmp_path, [api("m", {"path": str(source)})], poll_interval="300s")
    target = Path(config.modelsync.target)
    async with running(config) as daemon:
        first = await wait_event(daemon, EventKind.VERSION_ADDED, model="m", version=1)
        transfers = daemon.syncer.transfers

        write_tree(source / "2", inf_model("two"))
        await wait_event(daemon, EventKind.VERSION_ADDED, model="m", version=2)

        copied = transfers.files_received
        write_tree(source / "1", {"assets/vocab.txt": b"words"})
        changed = await wait_event(daemon, EventKind.STRUCTURE_CHANGED, model="m", version=1)
        assert changed.previous_store_path == first.store_path
        assert transfers.files_received == copied + 1  # the other files were hard-linked

        (source / "1/variables/variables.data-00000-of-00001").write_bytes(b"retrained")
        updated = await wait_event(daemon, EventKind.CONTENT_UPDATED, model="m", version=1)
        assert updated.previous_store_path == changed.store_path
        assert tree(target)["m/1/variables/variables.data-00000-of-00001"] == b"retrained"

        # Touching a file without changing it is not a change.
        before = daemon.syncer.events.revision
        (source / "1/saved_model.pb").touch()
        shutil.rmtree(source / "2")
        await wait_event(daemon, EventKind.VERSION_REMOVED, model="m", version=2)
        assert [e.kind for e in events(daemon, after=before)] == [EventKind.VERSION_REMOVED]
        await wait_until(lambda: not (target / "m" / "2").is_symlink(), what="grace over")
        assert sorted(tree(target)) == sorted(
            prefixed("m/1/", cpu_model("one") | {"assets/vocab.txt": b""})
        )


async def test_a_removed_version_stays_served_for_the_grace_across_a_restart(
    tmp_path: Path,
) -> None:
    source = tmp_path / "models"
    write_tree(source / "1", inf_model("one"))
    write_tree(source / "2", inf_model("two"))
    _, config = write_config(tmp_path, [api("m", {"path": str(source)})], removal_grace="1.5s")
    target = Path(config.modelsync.target)
    async with running(config) as daemon:
        await wait_event(daemon, EventKind.VERSION_ADDED, model="m", version=2)
        await wait_event(daemon, EventKind.VERSION_ADDED, model="m", version=1)
        shutil.rmtree(source / "2")
        removed = await wait_event(daemon, EventKind.VERSION_REMOVED, model="m", version=2)
    # Stopped within the grace: the next start keeps serving it until the grace is over.
    async with running(config) as daemon:
        assert daemon.syncer.events.revision == removed.revision
        assert (target / "m" / "2" / "saved_model.pb").read_bytes() == b"neuron graph two"
        await wait_until(lambda: not Path(removed.store_base_path).exists(), what="grace over")
        assert sorted(tree(target)) == ["m/1/saved_model.pb"]
        assert events(daemon, after=removed.revision) == []


async def test_debounce_publishes_a_version_written_file_by_file_once(tmp_path: Path) -> None:
    source = tmp_path / "models"
    write_tree(source / "a" / "1", inf_model("a1"))
    _, config = write_config(
        tmp_path, [api("d", {"dir": str(source)})], poll_interval="300s", debounce="0.5s"
    )
    async with running(config) as daemon:
        await wait_event(daemon, EventKind.VERSION_ADDED, model="a", version=1)
        before = daemon.syncer.events.revision
        # Written in an order that is invalid half-way (data, then index, then the graph).
        files = cpu_model("b3")
        for name in sorted(files, reverse=True):
            write_tree(source / "b" / "3", {name: files[name]})
            await asyncio.sleep(0.03)
        await wait_event(daemon, EventKind.VERSION_ADDED, model="b", version=3, after=before)
        assert [e.kind for e in events(daemon, after=before)] == [EventKind.VERSION_ADDED]


async def test_missing_folder_is_a_source_error_until_it_appears(tmp_path: Path) -> None:
    source = tmp_path / "later"
    _, config = write_config(tmp_path, [api("m", {"path": str(source)})], poll_interval="0.2s")
    async with running(config) as daemon:
        err = await wait_event(daemon, EventKind.SOURCE_ERROR)
        assert "is not a folder" in err.reason
        write_tree(source, inf_model("unversioned"))  # picked up by the periodic rescan
        await wait_event(daemon, EventKind.SOURCE_RECOVERED)
        await wait_event(daemon, EventKind.VERSION_ADDED, model="m", version=1)
        runner = daemon.syncer.runners[0]
        await wait_until(lambda: runner.watch is not None and runner.watch.active, what="watch")
        write_tree(source, {"assets/extra.txt": b"x"})
        await wait_event(daemon, EventKind.STRUCTURE_CHANGED, model="m", version=1)
