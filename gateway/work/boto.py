"""boto3 calls of the AWS backend: off the event loop, bounded, their errors classified."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar

from botocore.exceptions import (  # type: ignore[import-untyped]
    BotoCoreError,
    ClientError,
)

from gateway.work.base import Unavailable
from modelsync.s3 import describe
from modelsync.threads import run_blocking

T = TypeVar("T")


class Calls:
    """boto3 calls off the event loop, at most ``pool`` at once; errors become Unavailable
    unless the caller's ``handle`` turns them into something else first."""

    def __init__(self, pool: int) -> None:
        self._slots = asyncio.Semaphore(pool)

    async def __call__(
        self, fn: Callable[[], T], *, handle: Callable[[ClientError], T] | None = None
    ) -> T:
        def guarded() -> T:
            try:
                try:
                    return fn()
                except ClientError as exc:
                    if handle is None:
                        raise
                    return handle(exc)
            except (BotoCoreError, ClientError) as exc:
                raise Unavailable(describe(exc)) from exc

        async with self._slots:
            return await run_blocking(guarded, name="work-aws")


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def http_status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def spawn(fn: Callable[[], None]) -> None:
    """Runs ``fn`` in a daemon thread, nobody waiting for it."""
    threading.Thread(target=fn, name="work-aws", daemon=True).start()
