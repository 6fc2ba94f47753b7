"""The store on S3: the object under key K is ``s3://<bucket>/<prefix>/K``.

Versions are ETags. Conditional writes are S3's own (``If-None-Match: *`` to create, ``If-Match``
to replace or delete one version), so a create-if-absent has exactly one winner among any number
of writers. Each write carries a random ``writer`` token in its metadata: when botocore retries a
conditional write whose first attempt did land (the reply was lost), the retry's 412 is told
apart from a lost race by reading that token back.

Expiry: S3 cannot list objects by a time of our own, so a write with ``expires_at`` first puts an
empty marker ``<prefix>/.expiry/<expires_at in ms, 15 digits>/K``; markers list in time order, and
a sweep reads them up to now, deleting each object whose ``expires-at`` metadata still matches its
marker (with ``If-Match``, so an object rewritten meanwhile stays), then the marker.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from botocore.exceptions import ClientError  # type: ignore[import-untyped]

from gateway.work.base import (
    MAX_PAGE,
    AlreadyExists,
    Blob,
    Conflict,
    Entry,
    Page,
    Store,
    Unavailable,
    check_condition,
    check_key,
    check_limit,
    check_prefix,
)
from gateway.work.boto import Calls, error_code, http_status

EXPIRY = ".expiry/"
_WRITER = "writer"
_EXPIRES = "expires-at"
_CONFLICT_ATTEMPTS = 6


def _stamp(expires_at: float) -> str:
    return f"{max(0, round(expires_at * 1000)):015d}"


def _etag(response: Any) -> str:
    return str(response["ETag"]).strip('"')


def _missing(exc: ClientError) -> bool:
    return http_status(exc) == 404 or error_code(exc) in ("NoSuchKey", "404", "NotFound")


class S3Store(Store):
    def __init__(self, client: Any, calls: Calls, *, bucket: str, prefix: str) -> None:
        root = prefix.strip("/")
        if len(root.encode()) > 100:
            raise ValueError(f"store prefix {prefix!r}: at most 100 bytes")
        self.bucket = bucket
        self._root = f"{root}/" if root else ""
        self._client = client
        self._calls = calls

    async def check(self) -> None:
        """Unavailable, naming the bucket, when it does not exist or cannot be reached."""
        try:
            await self._calls(lambda: self._client.head_bucket(Bucket=self.bucket))
        except Unavailable as exc:
            raise Unavailable(f"s3://{self.bucket}: {exc}") from exc

    def close(self) -> None:
        self._client.close()

    async def put(
        self,
        key: str,
        body: bytes,
        *,
        content_type: str = "application/octet-stream",
        if_absent: bool = False,
        if_version: str | None = None,
        expires_at: float | None = None,
    ) -> str:
        check_key(key)
        check_condition(if_absent, if_version)
        writer = uuid.uuid4().hex
        params: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": self._root + key,
            "Body": bytes(body),
            "ContentType": content_type,
            "Metadata": {_WRITER: writer},
        }
        if if_absent:
            params["IfNoneMatch"] = "*"
        if if_version is not None:
            params["IfMatch"] = f'"{if_version}"'
        if expires_at is not None:
            stamp = params["Metadata"][_EXPIRES] = _stamp(expires_at)
            marker = f"{self._root}{EXPIRY}{stamp}/{key}"
            await self._calls(
                lambda: self._client.put_object(Bucket=self.bucket, Key=marker, Body=b"")
            )
        return await self._calls(lambda: self._put(params, key, writer))

    def _put(self, params: dict[str, Any], key: str, writer: str) -> str:
        for attempt in range(_CONFLICT_ATTEMPTS):
            try:
                return _etag(self._client.put_object(**params))
            except ClientError as exc:
                conditional = "IfNoneMatch" in params or "IfMatch" in params
                if http_status(exc) == 409 and conditional:  # a concurrent conditional write
                    time.sleep(0.02 * 2**attempt)
                    continue
                if not (conditional and (http_status(exc) == 412 or _missing(exc))):
                    raise
                landed = self._head(key)
                if landed is not None and landed.get("Metadata", {}).get(_WRITER) == writer:
                    return _etag(landed)  # our own earlier attempt created it
                if "IfNoneMatch" in params:
                    raise AlreadyExists(key) from None
                raise Conflict(f"{key} is not at version {params['IfMatch']}") from None
        raise Unavailable(f"{key}: conditional writes kept conflicting")

    def _head(self, key: str) -> Any:
        try:
            return self._client.head_object(Bucket=self.bucket, Key=self._root + key)
        except ClientError as exc:
            if _missing(exc):
                return None
            raise

    async def get(self, key: str) -> Blob | None:
        check_key(key)

        def fetch() -> Blob | None:
            try:
                found = self._client.get_object(Bucket=self.bucket, Key=self._root + key)
            except ClientError as exc:
                if _missing(exc):
                    return None
                raise
            body = found["Body"].read()
            stamp = found.get("Metadata", {}).get(_EXPIRES)
            return Blob(
                key,
                body,
                _etag(found),
                str(found.get("ContentType", "application/octet-stream")),
                found["LastModified"].timestamp(),
                int(stamp) / 1000 if stamp else None,
            )

        return await self._calls(fetch)

    async def delete(self, key: str, *, if_version: str | None = None) -> None:
        check_key(key)
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": self._root + key}
        if if_version is not None:
            params["IfMatch"] = f'"{if_version}"'

        def refused(exc: ClientError) -> None:
            if if_version is not None and (http_status(exc) == 412 or _missing(exc)):
                raise Conflict(f"{key} is not at version {if_version}") from None
            raise exc

        await self._calls(lambda: self._client.delete_object(**params), handle=refused)

    async def list(self, prefix: str, *, limit: int = MAX_PAGE, token: str = "") -> Page:
        check_prefix(prefix)
        check_limit(limit)
        return await self._calls(lambda: self._list(prefix, limit, token))

    def _list(self, prefix: str, limit: int, token: str) -> Page:
        params: dict[str, Any] = {
            "Bucket": self.bucket,
            "Prefix": self._root + prefix,
            "MaxKeys": limit,
        }
        if token:
            params["ContinuationToken"] = token
        while True:
            try:
                page = self._client.list_objects_v2(**params)
            except ClientError as exc:
                if token and http_status(exc) == 400:
                    raise ValueError(f"page token {token!r} is not valid here") from None
                raise
            entries = []
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(self._root) :]
                if not rel.startswith(EXPIRY):
                    modified = obj["LastModified"].timestamp()
                    entries.append(Entry(rel, int(obj["Size"]), _etag(obj), modified))
            more = str(page.get("NextContinuationToken", "")) if page.get("IsTruncated") else ""
            if entries or not more:
                return Page(entries, more)
            params["ContinuationToken"] = more  # a page of expiry markers only

    async def delete_prefix(self, prefix: str) -> int:
        check_prefix(prefix)

        def remove() -> int:
            count, token = 0, ""
            while True:
                page = self._list(prefix, MAX_PAGE, token)
                if page.entries:
                    objects = [{"Key": self._root + e.key} for e in page.entries]
                    done = self._client.delete_objects(
                        Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True}
                    )
                    if errors := done.get("Errors"):
                        raise Unavailable(f"cannot delete {errors[0].get('Key')}: {errors[0]}")
                count += len(page.entries)
                if not page.next_token:
                    return count
                token = page.next_token

        return await self._calls(remove)

    async def sweep(self, *, now: float | None = None, limit: int = MAX_PAGE) -> int:
        check_limit(limit)
        cutoff = time.time() if now is None else now
        return await self._calls(lambda: self._sweep(cutoff, limit))

    def _sweep(self, cutoff: float, limit: int) -> int:
        markers = f"{self._root}{EXPIRY}"
        params: dict[str, Any] = {"Bucket": self.bucket, "Prefix": markers, "MaxKeys": limit}
        page = self._client.list_objects_v2(**params)
        deleted = 0
        for obj in page.get("Contents", []):
            stamp, _, key = obj["Key"][len(markers) :].partition("/")
            if not stamp.isdigit() or int(stamp) / 1000 > cutoff:
                break
            deleted += self._expire(key, stamp)
            self._client.delete_object(Bucket=self.bucket, Key=obj["Key"])
        return deleted

    def _expire(self, key: str, stamp: str) -> int:
        """Deletes ``key`` if it still expires at ``stamp``; 1 if it did."""
        found = self._head(key)
        if found is None or found.get("Metadata", {}).get(_EXPIRES) != stamp:
            return 0
        try:
            self._client.delete_object(
                Bucket=self.bucket, Key=self._root + key, IfMatch=f'"{_etag(found)}"'
            )
        except ClientError as exc:
            if http_status(exc) == 412 or _missing(exc):  # rewritten or deleted meanwhile
                return 0
            raise
        return 1
