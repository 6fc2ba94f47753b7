"""``modelmux job``: submit, follow, list, stop and inspect BatchAPI jobs on a gateway.

A client of ``modelmux.v1.Jobs`` (through the Python client), so that nobody writes grpcurl JSON
by hand: ``modelmux job submit --api NAME --workers N --items items.json --watch``. Every action
takes ``--address`` (plaintext gRPC; ``MODELMUX_ADDRESS``, else 127.0.0.1:8500) and ``--json``
(machine-readable output: one JSON document, or one JSON line per update while watching).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from modelmux.client import Client, DryRun, FailedBatch, Job, ModelmuxError
from modelmux_common import jobwatch
from modelmux_common.config.fields import parse_duration

CALL_TIMEOUT = 30.0
# exit statuses, besides 0 (done; a watched job SUCCEEDED); argparse's own is 2 too (jobargs.EPILOG)
JOB_DID_NOT_SUCCEED = 1
BAD_INPUT = 2
CALL_FAILED = 3


class UsageError(Exception):
    """A command line or input file that cannot make a request (exit 2)."""


def main(args: argparse.Namespace) -> int:
    try:
        with Client(args.address, timeout=CALL_TIMEOUT) as client:
            return ACTIONS[args.action](client, args)
    except UsageError as exc:
        print(f"modelmux job {args.action}: {exc}", file=sys.stderr)
        return BAD_INPUT
    except ModelmuxError as exc:
        print(f"modelmux job {args.action}: {exc}", file=sys.stderr)
        return CALL_FAILED


def _submit(client: Client, args: argparse.Namespace) -> int:
    files, ndjson = _paths(args.files), _paths(args.ndjson)
    if (args.include or args.exclude) and args.items is not None:
        raise UsageError("--include and --exclude filter --files or --ndjson, not --items")
    timeout = _duration(args.timeout)
    request: dict[str, Any] = {
        "workers": args.workers,
        "items": _items(args.items) if args.items is not None else None,
        "files": files,
        "ndjson": ndjson,
        "batch_size": args.batch_size,
        "includes": args.include,
        "excludes": args.exclude,
        "config": _config(args.config) if args.config else None,
        "job_timeout": timeout,
        "max_receive_count": args.dead_letter,
    }
    if args.dry_run:
        dry = client.submit_job(args.api, **request, dry_run=True)
        _show(args, dry, _dry_run_lines)
        return 0
    job = client.submit_job(args.api, **request)
    if args.watch:
        return _watch(client, args, job.job_id)
    _show(args, job, _submitted_lines)
    return 0


def _get(client: Client, args: argparse.Namespace) -> int:
    if args.watch:
        return _watch(client, args, args.job_id)
    _show(args, client.get_job(args.job_id, api=args.api), _job_lines)
    return 0


def _list(client: Client, args: argparse.Namespace) -> int:
    jobs: list[Job] = []
    token = ""
    while len(jobs) < args.limit:
        size = min(1000, args.limit - len(jobs))
        page, token = client.list_jobs(
            args.api, statuses=args.status, page_size=size, page_token=token
        )
        jobs.extend(page)
        if not token:
            break
    _show(args, jobs[: args.limit], _table)
    return 0


def _stop(client: Client, args: argparse.Namespace) -> int:
    _show(args, client.stop_job(args.job_id, api=args.api), _job_lines)
    return 0


def _failed(client: Client, args: argparse.Namespace) -> int:
    batches: list[FailedBatch] = []
    token = ""
    while True:
        page, token = client.failed_batches(
            args.job_id, api=args.api, page_size=1000, page_token=token
        )
        batches.extend(page)
        if not token:
            break
    _show(args, batches, _failed_lines)
    return 0


ACTIONS: dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "submit": _submit,
    "get": _get,
    "list": _list,
    "stop": _stop,
    "failed": _failed,
}


def _watch(client: Client, args: argparse.Namespace, job_id: str) -> int:
    updates = client.watch_job(job_id, api=getattr(args, "api", ""))
    try:
        if args.json:
            last = None
            for last in updates:
                print(json.dumps(_plain(last)), flush=True)
        else:
            last = jobwatch.follow(updates, out=sys.stdout, tty=sys.stdout.isatty())
            if last is not None:
                print("\n".join(jobwatch.summary(last)), flush=True)
    except KeyboardInterrupt:
        print(
            f"\nstopped watching; job {job_id} goes on (modelmux job stop {job_id} stops it)",
            file=sys.stderr,
        )
        return 130
    finally:
        updates.close()
    return 0 if last is not None and last.succeeded else JOB_DID_NOT_SUCCEED


# -- input -------------------------------------------------------------------------------------


def _paths(values: list[str] | None) -> list[str]:
    """s3:// URIs as given; local paths made absolute (the gateway refuses relative ones)."""
    return [v if v.startswith("s3://") else os.path.abspath(v) for v in values or []]


def _items(name: str) -> list[Any]:
    text = sys.stdin.read() if name == "-" else _read(name)
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--items {name}: not JSON ({exc})") from exc
    if not isinstance(items, list):
        raise UsageError(f"--items {name}: expected a JSON array of items, got {_kind(items)}")
    return items


def _config(name: str) -> dict[str, Any]:
    try:
        config = yaml.safe_load(_read(name))
    except yaml.YAMLError as exc:
        raise UsageError(f"--config {name}: not YAML or JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise UsageError(f"--config {name}: expected a mapping, got {_kind(config)}")
    return config


def _read(name: str) -> str:
    try:
        return Path(name).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {name}: {exc.strerror}") from exc


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _duration(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise UsageError(f"--timeout: {exc}") from exc


# -- output ------------------------------------------------------------------------------------


def _show(args: argparse.Namespace, value: Any, lines: Callable[[Any], Iterator[str]]) -> None:
    if args.json:
        print(json.dumps(_plain(value), indent=2))
    else:
        for line in lines(value):
            print(line)


def _plain(value: Any) -> Any:
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return dataclasses.asdict(value)


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _submitted_lines(job: Job) -> Iterator[str]:
    yield job.job_id
    yield (
        f"submitted to {job.api} ({job.status}): {job.workers} workers, {job.source}, "
        f"batch size {job.batch_size}; follow it: modelmux job get {job.job_id} --watch"
    )


def _dry_run_lines(dry: DryRun) -> Iterator[str]:
    yield from dry.files
    if dry.file_count > len(dry.files):
        yield f"... and {dry.file_count - len(dry.files)} more files"
    yield (
        f"dry run: {dry.file_count} files, {dry.item_count} items, "
        f"{dry.total_batch_count} batches; nothing was started"
    )


def _job_lines(job: Job) -> Iterator[str]:
    rows = [
        ("job", job.job_id),
        ("api", job.api),
        ("status", job.status),
        (
            "batches",
            f"{job.total_batch_count} total, {job.batches_succeeded} succeeded, "
            f"{job.batches_failed} failed, {job.batches_in_flight} running",
        ),
        ("items", f"{job.item_count} ({job.source}, batch size {job.batch_size})"),
        ("paths", " ".join(job.paths)),
        ("workers", str(job.workers)),
        ("dead letter", f"after {job.max_receive_count} runs" if job.max_receive_count else "-"),
        ("timeout", jobwatch.seconds_text(job.timeout)),
        ("started", _when(job.start_time)),
        ("ended", _when(job.end_time)),
        ("hook", job.completion_hook),
        ("error", job.error),
        ("hook error", job.hook_error),
        ("config", json.dumps(job.config) if job.config else ""),
    ]
    for name, value in rows:
        if value:
            yield f"{name + ':':13}{value}"


def _table(jobs: list[Job]) -> Iterator[str]:
    yield f"{'JOB':32} {'API':20} {'STATUS':23} {'BATCHES':>11} {'FAILED':>7}  STARTED"
    for job in jobs:
        done = f"{job.batches_done}/{job.total_batch_count}"
        yield (
            f"{job.job_id:32} {job.api:20} {job.status:23} {done:>11} {job.batches_failed:>7}  "
            f"{_when(job.start_time)}"
        )


def _failed_lines(batches: list[FailedBatch]) -> Iterator[str]:
    if not batches:
        yield "no failed batches"
    for b in batches:
        letter = ", dead-lettered" if b.dead_lettered else ""
        yield f"batch {b.index} {b.batch_id}: {b.attempts} runs{letter}: {b.error}"
        yield f"  items: {json.dumps(b.items)}"
