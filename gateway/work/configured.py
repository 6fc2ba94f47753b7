"""A backend opened from an API's store settings (an AsyncAPI's `async` or a BatchAPI's `batch`
section): `store: aws` opens SQS + S3, `embedded` the folder given."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from gateway.work.aws import AwsConfig, open_aws
from gateway.work.base import Work
from gateway.work.embedded import open_embedded


class StoreSettings(Protocol):
    @property
    def store(self) -> str: ...
    @property
    def bucket(self) -> str: ...
    @property
    def prefix(self) -> str: ...
    @property
    def queue_prefix(self) -> str: ...
    @property
    def endpoint_url(self) -> str: ...
    @property
    def region(self) -> str: ...


async def open_configured(settings: StoreSettings, folder: str) -> Work:
    if settings.store == "aws":
        return await open_aws(
            AwsConfig(
                bucket=settings.bucket,
                prefix=settings.prefix,
                queue_prefix=settings.queue_prefix,
                endpoint_url=settings.endpoint_url,
                region=settings.region,
            )
        )
    return await open_embedded(Path(folder))
