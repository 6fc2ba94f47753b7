"""A queue on Amazon SQS (a standard queue; its dead letters in a second one, by redrive policy).

SQS counts time in whole seconds: visibility timeouts, delays and waits are rounded up. It cannot
tell a stale receipt from a current one when changing visibility, so a renew or release with a
lapsed lease may act on the newer delivery (docs/work.md).
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from botocore.exceptions import ClientError  # type: ignore[import-untyped]

from gateway.work import threads
from gateway.work.base import (
    MAX_ENQUEUE_DELAY,
    MAX_MESSAGE_BYTES,
    MAX_RECEIVE,
    MAX_VISIBILITY,
    LeaseLost,
    Message,
    Queue,
    QueueGone,
    QueueStats,
    Unavailable,
    check_duration,
    check_message,
    log,
)
from gateway.work.boto import Calls, error_code, spawn
from modelmux_common.config import Seconds

MAX_RETENTION = 14 * 24 * 3600  # SQS's longest: a message older than this is dropped
MAX_WAIT: Seconds = 20.0
_LAPSED = ("ReceiptHandleIsInvalid", "InvalidParameterValue", "MessageNotInflight")
_GONE = ("NonExistentQueue", "QueueDoesNotExist")
_BATCH = 10
_SEND_ATTEMPTS = 3


def _seconds(value: Seconds) -> int:
    return math.ceil(value - 1e-9) if value > 0 else 0


def _attributes(attrs: Mapping[str, str]) -> dict[str, Any]:
    return {k: {"DataType": "String", "StringValue": v} for k, v in attrs.items()}


def _message(raw: Mapping[str, Any]) -> Message:
    system = raw.get("Attributes", {})
    attrs = {k: str(v.get("StringValue", "")) for k, v in raw.get("MessageAttributes", {}).items()}
    return Message(
        id=str(raw["MessageId"]),
        body=str(raw["Body"]),
        receipt=str(raw["ReceiptHandle"]),
        receive_count=int(system.get("ApproximateReceiveCount", 1)),
        enqueued_at=int(system.get("SentTimestamp", 0)) / 1000,
        attributes=attrs,
    )


class SqsQueue(Queue):
    def __init__(
        self,
        client: Any,
        calls: Calls,
        name: str,
        url: str,
        *,
        max_receive_count: int | None,
        dead: SqsQueue | None = None,
    ) -> None:
        super().__init__(name, max_receive_count=max_receive_count)
        self.url = url
        self._client = client
        self._calls = calls
        self._dead = dead

    @property
    def dead(self) -> Queue | None:
        return self._dead

    def _gone(self, exc: ClientError) -> None:
        if any(code in error_code(exc) for code in _GONE):
            raise QueueGone(f"queue {self.name!r} does not exist") from exc
        raise exc

    async def enqueue(
        self, body: str, *, delay: Seconds = 0.0, attributes: Mapping[str, str] | None = None
    ) -> str:
        attrs = check_message(body, attributes)
        check_duration("delay", delay, high=MAX_ENQUEUE_DELAY)
        params: dict[str, Any] = {"QueueUrl": self.url, "MessageBody": body}
        if delay:
            params["DelaySeconds"] = _seconds(delay)
        if attrs:
            params["MessageAttributes"] = _attributes(attrs)

        def send() -> str:
            try:
                return str(self._client.send_message(**params)["MessageId"])
            except ClientError as exc:
                self._gone(exc)
                raise

        return await self._calls(send)

    async def enqueue_many(
        self, bodies: Sequence[str], *, attributes: Mapping[str, str] | None = None
    ) -> list[str]:
        attrs: dict[str, str] = {}
        for body in bodies:
            attrs = check_message(body, attributes)
        ids: list[str] = []
        for chunk in _chunks(list(bodies), attrs):
            ids.extend(await self._calls(functools.partial(self._send_batch, chunk, attrs)))
        return ids

    def _send_batch(self, bodies: list[str], attrs: dict[str, str]) -> list[str]:
        ids: dict[int, str] = {}
        pending = list(range(len(bodies)))
        for _ in range(_SEND_ATTEMPTS):
            entries: list[dict[str, Any]] = [
                {"Id": str(i), "MessageBody": bodies[i]} for i in pending
            ]
            if attrs:
                for entry in entries:
                    entry["MessageAttributes"] = _attributes(attrs)
            try:
                sent = self._client.send_message_batch(QueueUrl=self.url, Entries=entries)
            except ClientError as exc:
                self._gone(exc)
                raise
            for ok in sent.get("Successful", []):
                ids[int(ok["Id"])] = str(ok["MessageId"])
            failed = sent.get("Failed", [])
            pending = [int(f["Id"]) for f in failed]
            if not pending:
                return [ids[i] for i in range(len(bodies))]
            if any(f.get("SenderFault") for f in failed):
                raise Unavailable(f"SQS refused messages: {failed[0].get('Message', '')}")
        raise Unavailable(f"SQS did not take {len(pending)} of {len(bodies)} messages")

    async def receive(
        self, *, max_messages: int = 1, visibility_timeout: Seconds, wait: Seconds = 0.0
    ) -> list[Message]:
        if not 1 <= max_messages <= MAX_RECEIVE:
            raise ValueError(f"max_messages {max_messages}: expected 1 to {MAX_RECEIVE}")
        check_duration("visibility_timeout", visibility_timeout, high=MAX_VISIBILITY)
        check_duration("wait", wait, high=MAX_WAIT)
        deadline = time.monotonic() + wait
        while True:
            left = _seconds(deadline - time.monotonic())
            got = await threads.claim(
                self._calls,
                functools.partial(self._receive, max_messages, visibility_timeout, left),
                undo=self._put_back,
                spawn=spawn,
            )
            if got or time.monotonic() >= deadline:
                return got

    def _receive(self, count: int, lease: Seconds, wait: int) -> list[Message]:
        try:
            found = self._client.receive_message(
                QueueUrl=self.url,
                MaxNumberOfMessages=count,
                VisibilityTimeout=_seconds(lease),
                WaitTimeSeconds=wait,
                MessageSystemAttributeNames=["ApproximateReceiveCount", "SentTimestamp"],
                MessageAttributeNames=["All"],
            )
        except ClientError as exc:
            self._gone(exc)
            raise
        return [_message(raw) for raw in found.get("Messages", [])]

    def _put_back(self, messages: list[Message]) -> None:
        """Makes messages received for a receiver that was gone by then visible again."""
        entries = [
            {"Id": str(i), "ReceiptHandle": m.receipt, "VisibilityTimeout": 0}
            for i, m in enumerate(messages)
        ]
        try:
            self._client.change_message_visibility_batch(QueueUrl=self.url, Entries=entries)
        except Exception as exc:  # their lease lapses in time anyway
            log.warning("put_back_failed", queue=self.name, error=str(exc))

    async def _visibility(self, message: Message, seconds: int) -> bool:
        """Changes the message's visibility; False when SQS says the receipt no longer holds."""

        def lapsed(exc: ClientError) -> bool:
            if any(code in error_code(exc) for code in _LAPSED):
                return False
            self._gone(exc)
            raise exc

        def change() -> bool:
            self._client.change_message_visibility(
                QueueUrl=self.url, ReceiptHandle=message.receipt, VisibilityTimeout=seconds
            )
            return True

        return await self._calls(change, handle=lapsed)

    async def renew(self, message: Message, *, visibility_timeout: Seconds) -> None:
        check_duration("visibility_timeout", visibility_timeout, high=MAX_VISIBILITY)
        if not await self._visibility(message, _seconds(visibility_timeout)):
            raise LeaseLost(f"message {message.id} was deleted or its lease lapsed")

    async def release(self, message: Message, *, delay: Seconds = 0.0) -> None:
        check_duration("delay", delay, high=MAX_VISIBILITY)
        await self._visibility(message, _seconds(delay))

    async def delete(self, message: Message) -> None:
        def gone(exc: ClientError) -> None:
            if "ReceiptHandleIsInvalid" not in error_code(exc):  # deleted already
                self._gone(exc)

        def remove() -> None:
            self._client.delete_message(QueueUrl=self.url, ReceiptHandle=message.receipt)

        await self._calls(remove, handle=gone)

    async def _counts(self, url: str) -> tuple[int, int, int]:
        names = [
            "ApproximateNumberOfMessages",
            "ApproximateNumberOfMessagesNotVisible",
            "ApproximateNumberOfMessagesDelayed",
        ]

        def get() -> tuple[int, int, int]:
            try:
                found = self._client.get_queue_attributes(QueueUrl=url, AttributeNames=names)
            except ClientError as exc:
                self._gone(exc)
                raise
            values = found.get("Attributes", {})
            visible, in_flight, delayed = (int(values.get(n, 0)) for n in names)
            return visible, in_flight, delayed

        return await self._calls(get)

    async def stats(self) -> QueueStats:
        if self._dead is None:
            visible, in_flight, delayed = await self._counts(self.url)
            return QueueStats(visible, in_flight, delayed, 0, None)
        mine, dead = await asyncio.gather(self._counts(self.url), self._counts(self._dead.url))
        return QueueStats(*mine, sum(dead), None)


def _chunks(bodies: list[str], attrs: Mapping[str, str]) -> list[list[str]]:
    """Batches of at most 10 messages and 256 KiB, SQS's limits for one SendMessageBatch."""
    extra = sum(len(k.encode()) + len(v.encode()) for k, v in attrs.items())
    chunks: list[list[str]] = []
    size = 0
    for body in bodies:
        cost = len(body.encode()) + extra
        if not chunks or len(chunks[-1]) == _BATCH or size + cost > MAX_MESSAGE_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(body)
        size += cost
    return chunks
