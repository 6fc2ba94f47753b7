"""The at-scale backend: queues on Amazon SQS, the store on S3.

Any number of processes on any number of machines that open the same bucket, prefix and queue
prefix share the same work, with no coordination beyond what SQS (visibility timeouts, receive
counts, a redrive policy to a dead-letter queue) and S3 (conditional writes) provide.

Both clients are modelsync's boto3 configuration (default credential chain, ``endpoint_url`` for
MinIO / moto / LocalStack, standard retries). Every call runs in a daemon thread, as modelsync's
do, so the event loop never blocks and a long poll in progress never holds up the process's exit;
at most ``pool`` calls are in flight at once.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError  # type: ignore[import-untyped]

from gateway.work.base import (
    DEAD_SUFFIX,
    Queue,
    Work,
    check_max_receive_count,
    check_queue_name,
)
from gateway.work.boto import Calls, error_code
from gateway.work.s3 import S3Store
from gateway.work.sqs import MAX_RETENTION, SqsQueue
from modelmux_common.config import Seconds
from modelsync.s3 import make_client

_QUEUE_PREFIX = re.compile(r"^[A-Za-z0-9_-]{0,15}$")
_LONG_POLL: Seconds = 20.0


@dataclass(frozen=True, slots=True)
class AwsConfig:
    """Where the work lives on AWS (or an S3/SQS-compatible endpoint)."""

    bucket: str
    # Keys live under s3://<bucket>/<prefix>/; empty for the whole bucket.
    prefix: str = ""
    # Queue <name> is the SQS queue <queue_prefix><name>, its dead letters <...>-dead.
    queue_prefix: str = "modelmux-"
    # One endpoint for both services (moto, LocalStack); empty uses AWS.
    endpoint_url: str = ""
    region: str = ""
    # Attempts per API call (botocore's standard retry mode).
    max_attempts: int = 3
    # A call fails when no byte arrives for this long (long polls excepted: they get 20 s more).
    timeout: Seconds = 30.0
    # Calls in flight at once (and connections kept per service).
    pool: int = 32


class AwsWork(Work):
    store: S3Store

    def __init__(self, config: AwsConfig) -> None:
        if not _QUEUE_PREFIX.match(config.queue_prefix):
            raise ValueError(f"queue_prefix {config.queue_prefix!r}: up to 15 of [A-Za-z0-9_-]")
        self.config = config
        self._calls = Calls(config.pool)
        settings: dict[str, Any] = {
            "endpoint_url": config.endpoint_url,
            "region": config.region,
            "max_attempts": config.max_attempts,
            "pool": config.pool,
        }
        s3 = make_client(**settings, stall_timeout=config.timeout)
        self._sqs = make_client(
            **settings, stall_timeout=config.timeout + _LONG_POLL, service="sqs"
        )
        self.store = S3Store(s3, self._calls, bucket=config.bucket, prefix=config.prefix)

    def sqs_name(self, name: str) -> str:
        return self.config.queue_prefix + check_queue_name(name)

    async def _create(self, sqs_name: str) -> str:
        def create() -> str:
            return str(self._sqs.create_queue(QueueName=sqs_name)["QueueUrl"])

        return await self._calls(create)

    async def queue(self, name: str, *, max_receive_count: int | None = None) -> Queue:
        check_max_receive_count(max_receive_count)
        full = self.sqs_name(name)
        url = await self._create(full)
        dead: SqsQueue | None = None
        redrive = ""
        if max_receive_count is not None:
            dead_url = await self._create(full + DEAD_SUFFIX)
            await self._set(dead_url, {"MessageRetentionPeriod": str(MAX_RETENTION)})
            arn = await self._arn(dead_url)
            policy = {"deadLetterTargetArn": arn, "maxReceiveCount": str(max_receive_count)}
            redrive = json.dumps(policy)
            dead = SqsQueue(
                self._sqs, self._calls, name + DEAD_SUFFIX, dead_url, max_receive_count=None
            )
        await self._set(
            url, {"MessageRetentionPeriod": str(MAX_RETENTION), "RedrivePolicy": redrive}
        )
        return SqsQueue(
            self._sqs, self._calls, name, url, max_receive_count=max_receive_count, dead=dead
        )

    async def _set(self, url: str, attributes: dict[str, str]) -> None:
        await self._calls(
            lambda: self._sqs.set_queue_attributes(QueueUrl=url, Attributes=attributes)
        )

    async def _arn(self, url: str) -> str:
        def get() -> str:
            found = self._sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
            return str(found["Attributes"]["QueueArn"])

        return await self._calls(get)

    async def drop_queue(self, name: str) -> None:
        full = self.sqs_name(name)
        for sqs_name in (full, full + DEAD_SUFFIX):

            def drop(sqs_name: str = sqs_name) -> None:
                try:
                    url = self._sqs.get_queue_url(QueueName=sqs_name)["QueueUrl"]
                except ClientError as exc:
                    if "NonExistentQueue" in error_code(exc) or "QueueDoesNotExist" in error_code(
                        exc
                    ):
                        return
                    raise
                self._sqs.delete_queue(QueueUrl=url)

            await self._calls(drop)

    async def close(self) -> None:
        self._sqs.close()
        self.store.close()


async def open_aws(config: AwsConfig) -> AwsWork:
    """The AWS backend; checks that the bucket is reachable."""
    work = AwsWork(config)
    try:
        await work.store.check()
    except BaseException:
        await work.close()
        raise
    return work
