"""The watchdog side of local sources: folders moving and vanishing under a watch, lost threads.

Whether a folder is watched is read from the kernel (/proc/self/fdinfo lists every inotify watch
of the process by inode), so the tests wait on facts instead of on time.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

import pytest
from modelsync_helpers import (
    api,
    inf_model,
    running,
    ticks_pass,
    wait_event,
    wait_until,
    write_config,
    write_tree,
)
from structlog.testing import capture_logs
from watchdog.observers.inotify import InotifyWatchGroup
from watchdog.observers.inotify_c import InotifyEvent

from modelsync.events import EventKind
from modelsync.watch import FolderWatch

_WATCH = re.compile(r"^inotify wd:\S+ ino:([0-9a-f]+)", re.MULTILINE)


def watched_inodes() -> set[int]:
    found: set[int] = set()
    for info in Path("/proc/self/fdinfo").iterdir():
        try:
            text = info.read_text()
        except OSError:  # a descriptor closed meanwhile
            continue
        found.update(int(ino, 16) for ino in _WATCH.findall(text))
    return found


def watched(folder: Path) -> bool:
    return folder.is_dir() and folder.stat().st_ino in watched_inodes()


async def test_a_folder_moved_out_and_back_keeps_the_watch_live(tmp_path: Path) -> None:
    source = tmp_path / "models"
    write_tree(source / "a" / "1", inf_model("a1"))
    # A poll interval far beyond the test: only the watch can explain a prompt reaction.
    _, config = write_config(tmp_path, [api("d", {"dir": str(source)})], poll_interval="300s")
    async with running(config) as daemon:
        await wait_event(daemon, EventKind.VERSION_ADDED, model="a", version=1)
        # Back under another name: inotify returns the watch the folder still has, which watchdog
        # registers a second time (its RuntimeWarning used to end the inotify reader thread).
        (source / "a").rename(tmp_path / "parked")
        (tmp_path / "parked").rename(source / "b")
        await wait_event(daemon, EventKind.VERSION_ADDED, model="b", version=1)
        write_tree(source / "c" / "1", inf_model("c1"))
        await wait_event(daemon, EventKind.VERSION_ADDED, model="c", version=1)


async def test_a_folder_replaced_after_moving_out_keeps_the_watch_live(tmp_path: Path) -> None:
    root = tmp_path / "models"
    (root / "x" / "1").mkdir(parents=True)
    watch = FolderWatch(root, asyncio.Event())
    assert watch.start()
    try:
        # x/1 moves out with its watch; a new x/1 takes the path; both go (a KeyError used to end
        # the inotify reader thread on the second removal).
        (root / "x").rename(tmp_path / "parked")
        (root / "x" / "1").mkdir(parents=True)
        await wait_until(lambda: watched(root / "x" / "1"), what="the new x/1 watched")
        shutil.rmtree(root / "x")
        shutil.rmtree(tmp_path / "parked")
        (root / "y").mkdir()
        await wait_until(lambda: watched(root / "y"), what="a later folder watched")
        assert watch.active
    finally:
        watch.stop()


def _crash_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The next inotify event raises on watchdog's reader thread."""

    def crash(group: InotifyWatchGroup, event: InotifyEvent) -> None:
        monkeypatch.undo()
        raise RuntimeError("injected")

    monkeypatch.setattr(InotifyWatchGroup, "on_event", crash)


@pytest.mark.parametrize("lost", ["Emitter", "InotifyFD"])
async def test_a_lost_watch_thread_is_restarted_by_the_next_rescan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lost: str
) -> None:
    source = tmp_path / "models"
    write_tree(source / "a" / "1", inf_model("a1"))
    _, config = write_config(tmp_path, [api("d", {"dir": str(source)})])
    async with running(config) as daemon:
        await wait_event(daemon, EventKind.VERSION_ADDED, model="a", version=1)
        watch = daemon.syncer.runners[0].watch
        assert watch is not None and watch.active
        with capture_logs() as logs:
            if lost == "Emitter":  # it ends with the folder it watches: replace the folder
                shutil.rmtree(source)
                write_tree(source / "a" / "1", inf_model("a1"))
            else:  # an exception on the reader thread
                _crash_once(monkeypatch)
                (source / "b").mkdir()
            # Only a new watch can see this folder; the old one lost the thread that would.
            (source / "probe").mkdir()
            await wait_until(lambda: watched(source / "probe"), what="the watch restarted")
            await ticks_pass(daemon, 3)
        restarts = [e for e in logs if e["event"] == "watch_restarted"]
        assert len(restarts) == 1, logs
        assert restarts[0]["folder"] == str(source)
        assert restarts[0]["threads"] == [lost]
        if lost == "InotifyFD":
            assert restarts[0]["reason"] == "RuntimeError('injected')"
        assert watch.active
