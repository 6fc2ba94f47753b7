"""modelsync on local folders: watchdog-driven triggers, debouncing, the rescan fallback."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
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

from gateway.catalog import DesiredModel
from gateway.follower import Follower
from modelmux_common.config import Config
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


def python_api(name: str, models: dict[str, Any], handler: Path) -> dict[str, Any]:
    return {
        "name": name,
        "handler": {"type": "python", "path": str(handler), "multi_model_reloading": models},
    }


def mixed_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    """Python handler APIs "solo" (path: models/solo) and "py" (dir: models/py), tensorflow API
    "tf" (dir: models/tf)."""
    handler = tmp_path / "handler.py"
    handler.write_text("class Handler:\n    pass\n")
    # Python handlers' models only come through modelsync: the gateway must point at one.
    monkeypatch.setenv("MODELMUX_GATEWAY_MODELSYNC", "127.0.0.1:1")
    models = tmp_path / "models"
    apis = [
        python_api("solo", {"path": str(models / "solo")}, handler),
        python_api("py", {"dir": str(models / "py")}, handler),
        api("tf", {"dir": str(models / "tf")}),
    ]
    _, config = write_config(tmp_path, apis)
    write_tree(models / "solo", {"model.pkl": b"pickle solo"})
    return config


def versions(catalogues: list[Mapping[str, DesiredModel]], model: str) -> set[int]:
    """The versions of ``model`` in the last catalogue pushed."""
    if not catalogues or model not in catalogues[-1]:
        return set()
    return set(catalogues[-1][model].versions)


PY_FILES = {
    "a/model.pkl": b"pickle a",
    "b/1/data.txt": b"b one",
    "b/2/model.pkl": b"pickle b2",
    "b/2/nested/weights.bin": b"b two",
    "b/notes.md": b"outside any version: ignored",
}


async def test_python_handler_versions_hold_any_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = mixed_config(tmp_path, monkeypatch)
    models = tmp_path / "models"
    write_tree(models / "py", PY_FILES | {"e/1/model.pkl": b"e", "e/1/bad\\name": b"x"})
    # The same layout under a tensorflow API is not a SavedModel.
    write_tree(models / "tf", {"c/model.pkl": b"pickle c", **prefixed("d/1/", cpu_model("d"))})
    target = Path(config.modelsync.target)
    async with running(config) as daemon:
        for api_name, model, version in (
            ("solo", "solo", 1),
            ("py", "a", 1),
            ("py", "b", 1),
            ("py", "b", 2),
            ("tf", "d", 1),
        ):
            added = await wait_event(daemon, EventKind.VERSION_ADDED, model=model, version=version)
            assert added.api == api_name
        refused = await wait_event(daemon, EventKind.VALIDATION_FAILED, model="c", version=1)
        assert "saved_model.pb" in refused.reason
        hostile = await wait_event(daemon, EventKind.VALIDATION_FAILED, model="e", version=1)
        assert "backslash" in hostile.reason
        mirrored = {k: v for k, v in tree(target).items() if not k.startswith("d/")}
        assert mirrored == {
            "solo/1/model.pkl": b"pickle solo",
            "a/1/model.pkl": b"pickle a",
            "b/1/data.txt": b"b one",
            "b/2/model.pkl": b"pickle b2",
            "b/2/nested/weights.bin": b"b two",
        }


async def test_follower_leaves_skipped_apis_out_of_the_catalogue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = mixed_config(tmp_path, monkeypatch)
    models = tmp_path / "models"
    write_tree(models / "py", PY_FILES)
    write_tree(models / "tf" / "d" / "1", cpu_model("d1"))
    seen: dict[str, list[Mapping[str, DesiredModel]]] = {"skip": [], "all": []}
    async with running(config) as daemon:
        followers = {
            "skip": Follower(
                daemon.address, seen["skip"].append, skip_apis=frozenset({"py", "solo"})
            ),
            "all": Follower(daemon.address, seen["all"].append),
        }
        for follower in followers.values():
            follower.start()
        try:
            everything = {"solo": {1}, "a": {1}, "b": {1, 2}, "d": {1}}
            await wait_until(
                lambda: {m: versions(seen["all"], m) for m in everything} == everything,
                what="everything in the catalogue without skips",
            )
            assert set(seen["all"][-1]) == set(everything)
            await wait_until(lambda: versions(seen["skip"], "d") == {1}, what="d")
            assert set(seen["skip"][-1]) == {"d"}

            # Live events: a python version changes nothing; the tensorflow one is followed.
            pushed = len(seen["skip"])
            write_tree(models / "py" / "b" / "3", {"model.pkl": b"b three"})
            await wait_event(daemon, EventKind.VERSION_ADDED, model="b", version=3)
            write_tree(models / "tf" / "d" / "2", cpu_model("d2"))
            await wait_until(lambda: versions(seen["skip"], "d") == {1, 2}, what="d/2")
            assert len(seen["skip"]) == pushed + 1
            assert set(seen["skip"][-1]) == {"d"}
            await wait_until(lambda: versions(seen["all"], "d") == {1, 2}, what="d/2 in all")
            assert versions(seen["all"], "b") == {1, 2, 3}
        finally:
            for follower in followers.values():
                await follower.close()
