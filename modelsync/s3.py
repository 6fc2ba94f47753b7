"""S3 (and S3-compatible: MinIO, moto) sources through boto3.

One paginated ListObjectsV2 per poll; change detection by key, size and ETag. A download is a
GetObject with If-Match on the listed ETag (so it is exactly the listed content), streamed to disk
in chunks, continued with a Range request after a failure. The socket read timeout is the stall
timeout: a transfer fails when no byte arrives for that long, never on total time.
"""

from __future__ import annotations

import hashlib
import re
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped]
from botocore.config import Config as BotoConfig  # type: ignore[import-untyped]
from botocore.exceptions import (  # type: ignore[import-untyped]
    BotoCoreError,
    ClientError,
    ReadTimeoutError,
)

from modelsync.layout import ObjectInfo
from modelsync.sources import (
    CHUNK_BYTES,
    Listing,
    Objects,
    Source,
    SourceChanged,
    SourceError,
    Transfer,
    TransferStalled,
)

_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")
# Encryption whose ETag is not the MD5 of the content.
_OPAQUE_ETAG_SSE = {"aws:kms", "aws:kms:dsse"}
_GONE = {"NoSuchKey", "404", "PreconditionFailed", "412"}


def make_client(
    *,
    endpoint_url: str,
    region: str,
    max_attempts: int,
    stall_timeout: float,
    pool: int,
    service: str = "s3",
) -> Any:
    """A boto3 client (S3 unless ``service`` says otherwise: the work layer's SQS client shares
    this configuration) with the default credential chain (env, profile, IAM role/IRSA)."""
    config = BotoConfig(
        retries={"mode": "standard", "max_attempts": max_attempts},
        connect_timeout=min(10.0, stall_timeout),
        read_timeout=stall_timeout,
        max_pool_connections=pool,
        # Custom endpoints (MinIO, moto, IP addresses) rarely resolve bucket host names.
        s3={"addressing_style": "path"} if endpoint_url else {},
    )
    session = boto3.session.Session()
    return session.client(
        service, endpoint_url=endpoint_url or None, region_name=region or None, config=config
    )


def settings_client(settings: Any, *, pool: int) -> Any:
    """The S3 client of modelsync's settings (``modelsync.s3_*``, ``stall_timeout``): modelsync's
    own, and the Batch API's for listing job inputs."""
    return make_client(
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        max_attempts=settings.s3_max_attempts,
        stall_timeout=settings.stall_timeout,
        pool=pool,
    )


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/prefix/`` -> (bucket, "prefix/"); the prefix is empty for a whole bucket."""
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    return bucket, prefix


def _server_time(page: Any) -> float | None:
    """The Date header of a response: the server's clock, which LastModified also uses."""
    date = page.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    try:
        return parsedate_to_datetime(date).timestamp() if date else None
    except (TypeError, ValueError):
        return None


def describe(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
        return f"{err.get('Code', 'error')} ({status}): {err.get('Message', '')}".strip()
    return str(exc) or type(exc).__name__


class S3Source(Source):
    """One ``s3://bucket/prefix/``."""

    def __init__(self, uri: str, *, client: Any, stall_timeout: float) -> None:
        self.uri = uri
        self.bucket, self.prefix = split_uri(uri)
        self._client = client
        self._stall_timeout = stall_timeout

    def list(self) -> Listing:
        found: Objects = {}
        now: float | None = None
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix
            )
            for page in pages:
                now = _server_time(page) or now
                for obj in page.get("Contents", ()):
                    rel = obj["Key"][len(self.prefix) :]
                    etag = str(obj["ETag"]).strip('"')
                    modified = obj["LastModified"].timestamp() if "LastModified" in obj else 0.0
                    found[rel] = ObjectInfo(int(obj["Size"]), etag, modified=modified)
        except (BotoCoreError, ClientError) as exc:
            raise SourceError(f"cannot list {self.uri}: {describe(exc)}") from exc
        return Listing(found, now)

    def fetch(self, key: str, info: ObjectInfo, dest: Path, *, progress: Transfer) -> None:
        have = dest.stat().st_size if dest.exists() else 0
        if have > info.size:
            have = 0
        md5 = hashlib.md5(usedforsecurity=False)
        if have:
            with open(dest, "rb") as fh:
                while chunk := fh.read(CHUNK_BYTES):
                    md5.update(chunk)
        if have < info.size or info.size == 0:
            response = self._get(key, info, have)
            self._stream(response, dest, md5, append=have > 0, progress=progress)
        else:
            response = {}
        self._verify(key, info, dest, md5.hexdigest(), response)

    def _get(self, key: str, info: ObjectInfo, offset: int) -> Any:
        params: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": self.prefix + key,
            "IfMatch": f'"{info.etag}"',
        }
        if offset:
            params["Range"] = f"bytes={offset}-"
        try:
            return self._client.get_object(**params)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _GONE:
                raise SourceChanged(f"{key} changed or vanished since it was listed") from exc
            raise SourceError(f"cannot download {self.uri}{key}: {describe(exc)}") from exc
        except BotoCoreError as exc:
            raise SourceError(f"cannot download {self.uri}{key}: {describe(exc)}") from exc

    def _stream(
        self, response: Any, dest: Path, md5: Any, *, append: bool, progress: Transfer
    ) -> None:
        body = response["Body"]
        try:
            with open(dest, "ab" if append else "wb") as out:
                for chunk in body.iter_chunks(CHUNK_BYTES):
                    progress.check()
                    out.write(chunk)
                    md5.update(chunk)
                    progress.received(len(chunk))
        except ReadTimeoutError as exc:
            raise TransferStalled(f"no byte received for {self._stall_timeout:g} s") from exc
        except BotoCoreError as exc:
            raise SourceError(f"transfer broke off: {describe(exc)}") from exc
        finally:
            body.close()

    def _verify(self, key: str, info: ObjectInfo, dest: Path, digest: str, response: Any) -> None:
        size = dest.stat().st_size
        if size != info.size:
            dest.unlink(missing_ok=True)
            raise SourceError(f"{key}: got {size} bytes, the listing says {info.size}")
        opaque = response.get("ServerSideEncryption") in _OPAQUE_ETAG_SSE or bool(
            response.get("SSECustomerAlgorithm")
        )
        # Multipart ETags ("<md5 of part md5s>-<parts>") and KMS ETags are not content MD5s.
        if _MD5_ETAG.match(info.etag) and not opaque and digest != info.etag:
            dest.unlink(missing_ok=True)
            raise SourceError(f"{key}: MD5 {digest} does not match the ETag {info.etag}")
