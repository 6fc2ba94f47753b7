"""Claiming work in a thread without losing it when the awaiting task is cancelled.

A receive runs its blocking claim (an SQLite transaction, an SQS long poll) in a thread. When
the task awaiting it is cancelled (shutdown), the claim may still succeed afterwards, and the
messages it took would stay hidden until their visibility lapsed. :func:`claim` hands such
messages to an ``undo`` (release them) instead: exactly one side, the thread or the cancelled
task, sees the result and either returns it or undoes it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class _Handoff:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.abandoned = False
        self.done = False
        self.result: object = None


async def claim(
    run: Callable[[Callable[[], list[T]]], Awaitable[list[T]]],
    fn: Callable[[], list[T]],
    *,
    undo: Callable[[list[T]], None],
    spawn: Callable[[Callable[[], None]], None],
) -> list[T]:
    """``await run(fn)``; if the caller is cancelled meanwhile, whatever ``fn`` claimed goes to
    ``undo`` (run in the claiming thread, or through ``spawn`` when the claim finished first)."""
    state = _Handoff()

    def guarded() -> list[T]:
        got = fn()
        with state.lock:
            if not state.abandoned:
                state.done, state.result = True, got
                return got
        if got:
            undo(got)
        return []

    try:
        return await run(guarded)
    except asyncio.CancelledError:
        with state.lock:
            state.abandoned = True
            left: list[T] = state.result if state.done else []  # type: ignore[assignment]
        if left:
            spawn(lambda: undo(left))
        raise
