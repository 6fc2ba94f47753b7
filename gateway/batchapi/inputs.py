"""A job's input: an item list, files listed from local folders or S3, or NDJSON files, split
into batches. Blocking code (file system, boto3): callers run it in a thread.

S3 goes through the same boto3 client configuration as modelsync's (``modelsync.s3_*`` keys:
endpoint_url, region, retries; credentials from the default chain).
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

from gateway.errors import InvalidArgument, NotFound, shown
from modelmux_common.config import Config
from modelsync.s3 import describe, settings_client, split_uri

ITEM_LIST, FILE_PATH_LISTER, DELIMITED_FILES = "item_list", "file_path_lister", "delimited_files"
SOURCES = (ITEM_LIST, FILE_PATH_LISTER, DELIMITED_FILES)
# How many listed files a dry run returns (it counts them all).
DRY_RUN_FILES = 1000


class InputFailed(Exception):
    """Listing or reading the input failed while the job was enqueued (the job's error)."""


@dataclass(frozen=True, slots=True)
class Source:
    """What SubmitJob asked for."""

    kind: str
    batch_size: int
    items: list[Any] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    includes: list[str] = field(default_factory=list)
    excludes: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Batch:
    """One batch: its items, or (an NDJSON line that is not JSON) why it cannot run."""

    index: int
    items: list[Any]
    error: str = ""


@dataclass(frozen=True, slots=True)
class Listing:
    """What a dry run reports."""

    files: list[str]
    file_count: int
    item_count: int
    batch_count: int


class Inputs:
    """Lists and reads job inputs for one gateway."""

    def __init__(self, config: Config) -> None:
        self.settings = config.modelsync
        self._s3: Any = None

    def _client(self) -> Any:
        if self._s3 is None:
            self._s3 = settings_client(self.settings, pool=8)
        return self._s3

    # -- checks at submission ----------------------------------------------------------------

    def check(self, source: Source) -> None:
        """The quick checks SubmitJob makes before it answers: every path exists (a local file
        or folder; an S3 bucket with something under the prefix). NotFound or InvalidArgument."""
        if source.batch_size < 1:
            raise InvalidArgument(f"{source.kind}.batch_size {source.batch_size}: at least 1")
        if source.kind == ITEM_LIST:
            if not source.items:
                raise InvalidArgument("item_list.items is empty")
            return
        if not source.paths:
            raise InvalidArgument(f"{source.kind}.paths is empty")
        for path in source.paths:
            if path.startswith("s3://"):
                self._check_s3(source.kind, path)
            elif not os.path.isabs(path):
                raise InvalidArgument(
                    f"{source.kind}.paths: {shown(path)} is neither an s3:// URI nor an absolute "
                    "local path"
                )
            elif not os.path.exists(path):
                raise NotFound(f"{source.kind}.paths: {shown(path)} does not exist")

    def _check_s3(self, kind: str, uri: str) -> None:
        bucket, prefix = split_uri(uri)
        if not bucket:
            raise InvalidArgument(f"{kind}.paths: {shown(uri)} names no bucket")
        try:
            page = self._client().list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code == "NoSuchBucket":
                raise NotFound(f"{kind}.paths: bucket {shown(bucket)} does not exist") from None
            raise InvalidArgument(
                f"{kind}.paths: cannot list {shown(uri)}: {describe(exc)}"
            ) from None
        except BotoCoreError as exc:
            raise InvalidArgument(
                f"{kind}.paths: cannot list {shown(uri)}: {describe(exc)}"
            ) from None
        if not page.get("KeyCount", len(page.get("Contents", ()))):
            raise NotFound(f"{kind}.paths: nothing under {shown(uri)}")

    # -- listing -----------------------------------------------------------------------------

    def files(self, source: Source) -> Iterator[str]:
        """Every file of the source's paths that passes includes and excludes, in listing order
        (each path in turn; inside one, sorted)."""
        for path in source.paths:
            listed = self._s3_files(path) if path.startswith("s3://") else _local_files(path)
            for name in listed:
                if source.includes and not any(
                    fnmatch.fnmatchcase(name, g) for g in source.includes
                ):
                    continue
                if any(fnmatch.fnmatchcase(name, g) for g in source.excludes):
                    continue
                yield name

    def _s3_files(self, uri: str) -> Iterator[str]:
        bucket, prefix = split_uri(uri)
        try:
            pages = (
                self._client()
                .get_paginator("list_objects_v2")
                .paginate(Bucket=bucket, Prefix=prefix)
            )
            for page in pages:
                for obj in page.get("Contents", ()):
                    if not obj["Key"].endswith("/"):
                        yield f"s3://{bucket}/{obj['Key']}"
        except (BotoCoreError, ClientError) as exc:
            raise InputFailed(f"cannot list {uri}: {describe(exc)}") from exc

    def _lines(self, name: str) -> Iterator[bytes]:
        if not name.startswith("s3://"):
            try:
                with open(name, "rb") as fh:
                    yield from fh
            except OSError as exc:
                raise InputFailed(f"cannot read {name}: {exc}") from exc
            return
        bucket, key = split_uri(name)
        try:
            body = self._client().get_object(Bucket=bucket, Key=key)["Body"]
            yield from body.iter_lines(keepends=True)
        except (BotoCoreError, ClientError) as exc:
            raise InputFailed(f"cannot read {name}: {describe(exc)}") from exc

    # -- batches -----------------------------------------------------------------------------

    def batches(self, source: Source) -> Iterator[Batch]:
        """The job's batches in order. Raises InputFailed when the files list nothing or one
        cannot be read."""
        if source.kind == ITEM_LIST:
            yield from _chunks(iter(source.items), source.batch_size)
            return
        files = self.files(source)
        first = next(files, None)
        if first is None:
            raise InputFailed(f"{', '.join(source.paths)}: no file (after includes and excludes)")
        names = _prepend(first, files)
        if source.kind == FILE_PATH_LISTER:
            yield from _chunks(names, source.batch_size)
        else:
            yield from self._ndjson_batches(names, source.batch_size)

    def _ndjson_batches(self, names: Iterable[str], size: int) -> Iterator[Batch]:
        index, items, raw, error = 0, [], [], ""
        for name in names:
            for number, line in enumerate(self._lines(name), start=1):
                text = line.decode("utf-8", errors="replace").rstrip("\r\n")
                if not text.strip():
                    continue
                raw.append(text)
                try:
                    items.append(json.loads(text))
                except ValueError as exc:
                    error = error or f"{name}: line {number} is not JSON ({exc})"
                if len(raw) == size:
                    yield _batch(index, items, raw, error)
                    index, items, raw, error = index + 1, [], [], ""
        if raw:
            yield _batch(index, items, raw, error)

    def dry_run(self, source: Source) -> Listing:
        files: list[str] = []
        count = 0
        if source.kind != ITEM_LIST:
            for name in self.files(source):
                count += 1
                if len(files) < DRY_RUN_FILES:
                    files.append(name)
        items = batches = 0
        if source.kind == ITEM_LIST or count:
            for batch in self.batches(source):
                batches += 1
                items += len(batch.items)
        return Listing(files, count, items, batches)


def _batch(index: int, items: list[Any], raw: list[str], error: str) -> Batch:
    if error:  # the batch fails without running; its items are its lines as they are
        return Batch(index, list(raw), error)
    return Batch(index, items)


def _prepend(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


def _chunks(items: Iterator[Any], size: int) -> Iterator[Batch]:
    index, chunk = 0, []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield Batch(index, chunk)
            index, chunk = index + 1, []
    if chunk:
        yield Batch(index, chunk)


def _local_files(path: str) -> Iterator[str]:
    if os.path.isfile(path):
        yield path
        return
    if not os.path.isdir(path):
        raise InputFailed(f"{path} does not exist")
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            yield os.path.join(root, name)
