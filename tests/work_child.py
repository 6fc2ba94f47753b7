"""A child process of the work-layer tests: opens the backend the first argument describes
(JSON: the embedded folder, or moto's endpoint, bucket and queue prefix) and plays one role,
printing one line per thing done, flushed, so the test knows what was acknowledged before it
kills the process."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from gateway.work import AlreadyExists, AwsConfig, Work, open_aws, open_embedded


async def open_backend(spec: dict[str, Any]) -> Work:
    if spec["kind"] == "embedded":
        return await open_embedded(Path(spec["folder"]), poll_interval=spec.get("poll", 0.5))
    return await open_aws(
        AwsConfig(
            bucket=spec["bucket"],
            prefix=spec["prefix"],
            queue_prefix=spec["queue_prefix"],
            endpoint_url=spec["endpoint"],
            region="us-east-1",
        )
    )


def say(*words: object) -> None:
    print(*words, flush=True)


async def produce(work: Work, queue_name: str) -> None:
    """Enqueues and stores until killed, saying ``acked N`` after both writes of N returned."""
    queue = await work.queue(queue_name)
    n = 0
    while True:
        await queue.enqueue(f"m{n}")
        await work.store.put(f"items/{n}", f"item {n}".encode())
        say("acked", n)
        n += 1


async def hold(work: Work, queue_name: str, lease: float) -> None:
    """Receives one message, says ``holding ID COUNT``, and keeps it until killed."""
    queue = await work.queue(queue_name)
    while not (got := await queue.receive(visibility_timeout=lease, wait=5)):
        pass
    say("holding", got[0].id, got[0].receive_count)
    await asyncio.Event().wait()


async def wake(work: Work, queue_name: str) -> None:
    """Waits once (up to 20 s) for a message, saying ``got BODY`` when it comes."""
    queue = await work.queue(queue_name)
    for message in await queue.receive(visibility_timeout=60, wait=20):
        say("got", message.body)
        await queue.delete(message)
    await asyncio.Event().wait()


async def drain(work: Work, queue_name: str) -> None:
    """Receives and deletes, saying ``got BODY`` for each, until a line arrives on stdin."""
    queue = await work.queue(queue_name)
    stop = asyncio.ensure_future(asyncio.to_thread(sys.stdin.readline))
    say("ready")
    while not stop.done():
        for message in await queue.receive(max_messages=3, visibility_timeout=60, wait=0.5):
            say("got", message.body)
            await queue.delete(message)


async def create(work: Work, me: str, keys: list[str]) -> None:
    """Says ``ready``, waits for a line on stdin (so that every child starts at once), then
    tries to create each key with body ``me``, saying ``won KEY`` or ``lost KEY``."""
    say("ready")
    await asyncio.to_thread(sys.stdin.readline)
    for key in keys:
        try:
            await work.store.put(key, me.encode(), if_absent=True)
            say("won", key)
        except AlreadyExists:
            say("lost", key)


async def main() -> None:
    spec = json.loads(sys.argv[1])
    role, args = sys.argv[2], sys.argv[3:]
    work = await open_backend(spec)
    try:
        if role == "produce":
            await produce(work, args[0])
        elif role == "hold":
            await hold(work, args[0], float(args[1]))
        elif role == "wake":
            await wake(work, args[0])
        elif role == "drain":
            await drain(work, args[0])
        elif role == "create":
            await create(work, args[0], args[1:])
        else:
            raise SystemExit(f"unknown role {role}")
    finally:
        await work.close()


if __name__ == "__main__":
    asyncio.run(main())
