"""The work layer across real processes, on both backends: what a killed process acknowledged
is there after it died, a message a killed consumer held comes back, and processes racing on
one create or one queue each get their own share."""

from __future__ import annotations

import collections
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from modelsync_helpers import MotoServer, wait_until
from work_helpers import KINDS, Backend, backend_for, moto_fixture, start_child

from gateway.work import Message


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    yield from moto_fixture(tmp_path_factory)


@pytest.fixture(params=KINDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    async with backend_for(request, tmp_path) as b:
        yield b


async def test_everything_acknowledged_survives_kill_9(backend: Backend) -> None:
    child = start_child(backend.spec, "produce", "durable")
    try:
        await wait_until(lambda: len(child.said("acked")) >= 40, timeout=60, what="40 acks")
    finally:
        child.popen.send_signal(signal.SIGKILL)
        child.kill()
    acked = {int(words[0]) for words in child.said("acked")}
    work = await backend.reopen()
    try:
        for n in acked:
            item = await work.store.get(f"items/{n}")
            assert item is not None and item.body == f"item {n}".encode()
        queue = await work.queue("durable")
        bodies: set[str] = set()
        while got := await queue.receive(max_messages=10, visibility_timeout=60, wait=1):
            bodies.update(m.body for m in got)
        # every acknowledged message, and perhaps the one the kill interrupted
        assert {f"m{n}" for n in acked} <= bodies
        assert len(bodies) <= len(acked) + 1
    finally:
        await work.close()


async def test_message_held_by_a_killed_consumer_comes_back(backend: Backend) -> None:
    queue = await backend.work.queue("held")
    mid = await queue.enqueue("precious")
    lease = 2.0
    child = start_child(backend.spec, "hold", "held", str(lease))
    try:
        held = await wait_until(lambda: child.said("holding"), timeout=30, what="holding")
    finally:
        child.kill()
    assert held == [[mid, "1"]]
    assert await queue.receive(visibility_timeout=30) == []  # its lease still runs
    got = await queue.receive(visibility_timeout=30, wait=lease + 10)
    assert [(m.id, m.body, m.receive_count) for m in got] == [(mid, "precious", 2)]


async def test_create_if_absent_racing_processes_has_one_winner(backend: Backend) -> None:
    keys = [f"hooks/job{i}/ran" for i in range(10)]
    children = [start_child(backend.spec, "create", f"p{n}", *keys) for n in range(4)]
    try:
        for child in children:
            await wait_until(lambda child=child: child.said("ready"), timeout=30, what="ready")
        for child in children:
            child.tell("go")
        for child in children:
            assert child.finish() == 0
    finally:
        for child in children:
            child.kill()
    for key in keys:
        winners = [f"p{n}" for n, c in enumerate(children) if [key] in c.said("won")]
        losers = [f"p{n}" for n, c in enumerate(children) if [key] in c.said("lost")]
        assert len(winners) == 1 and len(losers) == 3, (key, winners, losers)
        stored = await backend.work.store.get(key)
        assert stored is not None and stored.body == winners[0].encode()


async def test_consumers_in_several_processes_share_one_queue(backend: Backend) -> None:
    queue = await backend.work.queue("shared")
    children = [start_child(backend.spec, "drain", "shared") for _ in range(3)]
    try:
        for child in children:
            await wait_until(lambda child=child: child.said("ready"), timeout=30, what="ready")
        bodies = [f"task {i}" for i in range(30)]
        await queue.enqueue_many(bodies)
        await wait_until(
            lambda: sum(len(c.said("got")) for c in children) >= 30, timeout=30, what="30 gots"
        )
        for child in children:
            child.tell("stop")
        for child in children:
            assert child.finish() == 0
    finally:
        for child in children:
            child.kill()
    got = collections.Counter(
        words[0] + " " + words[1] for c in children for words in c.said("got")
    )
    assert sorted(got) == sorted(bodies)
    assert set(got.values()) == {1}  # no message went to two consumers
    leftover: list[Message] = await queue.receive(visibility_timeout=30)
    assert leftover == []


# embedded only: SQS's long poll wakes receivers itself
@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
async def test_a_receiver_in_another_process_is_woken_by_its_doorbell(backend: Backend) -> None:
    queue = await backend.work.queue("bell")
    bells = Path(backend.spec["folder"]) / "bells"
    # it polls once a minute: only the doorbell can wake it within the test's deadline
    child = start_child({**backend.spec, "poll": 60}, "wake", "bell")
    try:
        await wait_until(lambda: bells.is_dir() and list(bells.iterdir()), timeout=30, what="bell")
        await queue.enqueue("ding")
        await wait_until(lambda: child.said("got"), timeout=10, what="the woken receiver")
    finally:
        child.kill()
    assert child.said("got") == [["ding"]]
    # the killed process's pipe is removed by the next ring
    await queue.enqueue("dong")
    assert list(bells.iterdir()) == []
