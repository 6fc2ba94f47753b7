"""Blocking calls (boto3, file hashing and copying) off the event loop, in daemon threads.

A daemon thread per call rather than an executor: a transfer stuck in a socket read must not keep
the process alive at shutdown (executor threads are joined at exit). Concurrency is bounded by the
callers (semaphores), not here.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def _settle(fut: asyncio.Future[T], result: T | None, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)  # type: ignore[arg-type]


async def run_blocking(fn: Callable[[], T], *, name: str = "modelsync-io") -> T:
    """Runs ``fn`` in a new daemon thread and awaits its result.

    Cancelling the awaiting task does not stop ``fn``; blocking code checks an abort flag instead.
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def target() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = fn()
        except BaseException as exc:  # handed to the awaiting task, which decides
            error = exc
        # RuntimeError: the loop is closed, nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle, fut, result, error)

    threading.Thread(target=target, name=name, daemon=True).start()
    return await fut
