"""A batch worker: one process that builds a BatchAPI's handler for a job and runs its batches.

The gateway starts a job's ``workers`` of these (``batch.spawn_workers``, the default) and
replaces those that die; ``modelmux worker --api NAME`` runs one on any machine that shares the
job store (``batch.store: aws``): it takes the API's running jobs one after another.

For each job the worker builds the handler once (``Handler(tensorflow_client, config, job_spec)``,
arguments by name; ``config`` is handler.config deep-merged with the job's config, the job's
values winning), then receives batches from the job's queue, holds each (its visibility renewed
while handle_batch runs), records its outcome with create-if-absent and deletes the message. A
batch whose handler raises is released for another run while dead_letter allows, else recorded
as failed with its items; a batch whose worker died comes back after its visibility timeout.
When every batch has an outcome, the one worker that creates the hook claim runs the completion
hook (``handle_on_job_complete`` or ``on_job_complete``) and ends the job.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import os
import pickle
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import grpc
import structlog
from prometheus_client import Counter, Histogram

from gateway.batchapi.jobs import (
    COMPLETED_WITH_FAILURES,
    HOOK_ABSENT,
    HOOK_FAILED,
    HOOK_RUNNING,
    HOOK_SUCCEEDED,
    RUNNING,
    SUCCEEDED,
    TIMED_OUT,
    WORKER_ERROR,
    Job,
    Jobs,
    Outcome,
    drop_job,
    job_queue,
    open_work,
)
from gateway.work import Message, Queue, QueueGone, Work, WorkError, holding
from modelmux_common import logs, supervision, tracing
from modelmux_common.config import ApiConfig, Config, load
from modelmux_common.metrics import MULTIPROC_ENV, REGISTRY, Endpoint

log = structlog.get_logger("modelmux.batch")

# In a worker the gateway started, metrics go to the gateway's multiprocess folder (its /metrics
# serves them); a standalone `modelmux worker` keeps them in REGISTRY (--metrics-listen).
_REGISTRY = None if os.environ.get(MULTIPROC_ENV) else REGISTRY
BATCHES = Counter(
    "modelmux_batch_batches",
    "Batches ended, by API, job and outcome (succeeded, failed)",
    ["api", "job", "outcome"],
    registry=_REGISTRY,
)
BATCH_SECONDS = Histogram(
    "modelmux_batch_batch_seconds",
    "Time of one handle_batch call, by API and job",
    ["api", "job"],
    registry=_REGISTRY,
)
HOOK_NAMES = ("handle_on_job_complete", "on_job_complete")
BATCH_ARGS = ("payload", "batch_id")
# How long one receive waits for a batch (the embedded queue wakes at once when one comes).
RECEIVE_WAIT = 1.0
# How often a worker re-reads its job's record (stopped, timed out, ended elsewhere).
REFRESH = 1.0
# How long a standalone worker waits before it looks for running jobs again.
IDLE = 1.0


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` deep-merged onto ``base``: nested mappings merge, any other value of ``over``
    wins."""
    out = dict(base)
    for key, value in over.items():
        old = out.get(key)
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            out[key] = merge(old, value)
        else:
            out[key] = value
    return out


def _error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) < 1000 else text[:1000] + " ..."


class Handler:
    """A job's handler instance in this process, every call on one thread of its own."""

    def __init__(self, runtime: Any, executor: ThreadPoolExecutor) -> None:
        self.instance = runtime.handler
        self.executor = executor
        entry = self.instance.handle_batch
        names = [p.name for p in inspect.signature(entry).parameters.values()]
        self.positional = bool(names) and names[0] not in BATCH_ARGS
        self.args = [n for n in names if n in BATCH_ARGS]
        self.hook: Callable[[], Any] | None = next(
            (h for n in HOOK_NAMES if callable(h := getattr(self.instance, n, None))), None
        )

    def _call(self, items: list[Any], batch_id: str) -> None:
        args = {"payload": items, "batch_id": batch_id}
        positional = [items] if self.positional else []
        self.instance.handle_batch(*positional, **{n: args[n] for n in self.args})

    async def _run(
        self, span: tracing.Client | None, entry: Callable[..., Any], *args: Any
    ) -> None:
        """``entry(*args)`` on the handler's thread, ``span`` current there while it runs (so
        the handler's ``tensorflow_client.predict`` is its child), ended with how it ended."""

        loop = asyncio.get_running_loop()
        if span is None:
            await loop.run_in_executor(self.executor, entry, *args)
            return

        def run() -> None:
            token = span.tracing.current(span.span)
            try:
                entry(*args)
            finally:
                span.tracing.restore(token)

        code = grpc.StatusCode.CANCELLED
        try:
            await loop.run_in_executor(self.executor, run)
            code = grpc.StatusCode.OK
        except Exception:
            code = grpc.StatusCode.INTERNAL
            raise
        finally:
            span.end(code)

    async def handle_batch(
        self, items: list[Any], batch_id: str, span: tracing.Client | None = None
    ) -> None:
        await self._run(span, self._call, items, batch_id)

    async def on_job_complete(self, span: tracing.Client | None = None) -> None:
        assert self.hook is not None
        await self._run(span, self.hook)


class BatchWorker:
    """Runs jobs of one BatchAPI in this process."""

    def __init__(self, config: Config, api: ApiConfig, *, gateway: str, work: Work) -> None:
        assert api.batch_config is not None
        self.config = config
        self.api = api
        self.cfg = api.batch_config
        self.gateway = gateway
        self.work = work
        self.jobs = Jobs(api.name, work.store)
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="handler")

    # -- jobs --------------------------------------------------------------------------------

    async def serve(self, stop: asyncio.Event) -> None:
        """Runs the API's running jobs, oldest first, until ``stop``."""
        while not stop.is_set():
            ran = False
            for job_id in await self.jobs.active():
                job = await self.jobs.get(job_id)
                if job is not None and job.status == RUNNING:
                    await self.run_job(job_id)
                    ran = True
                    break
            if not ran:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), IDLE)

    def _build(self, job: Job) -> Handler:
        from gateway.handlers.worker import Runtime

        runtime = Runtime(
            self.config,
            self.api,
            gateway=self.gateway,
            cache_dir=os.path.join(self.config.gateway.state_dir, "batch-cache", job.job_id),
            descriptors=b"",
            handler_config=merge(self.api.handler_config, job.config),
            extra={"job_spec": job.spec()},
        )
        return Handler(runtime, self.executor)

    async def run_job(self, job_id: str) -> None:
        """Builds the handler for the job and runs its batches until the job ends (or its
        queue is dropped)."""
        job = await self.jobs.get(job_id)
        if job is None or job.status != RUNNING:
            return
        structlog.contextvars.bind_contextvars(job_id=job_id)
        log.info("batch_worker_job", owner=self.owner)
        queue = await self.work.queue(
            job_queue(self.api.name, job_id), max_receive_count=job.max_runs
        )
        loop = asyncio.get_running_loop()
        try:
            handler = await loop.run_in_executor(self.executor, self._build, job)
        except Exception as exc:  # the handler's own code: the job's WORKER_ERROR
            log.error("batch_handler_start_failed", error=_error(exc))
            error = f"the handler could not start: {exc}"
            await self.jobs.end(job_id, WORKER_ERROR, error=error)
            await self._cleanup(job_id)
            return
        try:
            await self._drain(job, queue, handler)
        except QueueGone:
            log.info("batch_queue_gone")
        finally:
            structlog.contextvars.unbind_contextvars("job_id")

    async def _drain(self, job: Job, queue: Queue, handler: Handler) -> None:
        checked = 0.0
        while True:
            now = time.time()
            if now - checked > REFRESH:
                checked = now
                current = await self.jobs.get(job.job_id)
                if current is None or current.ended:
                    return
                job = current
                if job.due(now):
                    await self.jobs.end(job.job_id, TIMED_OUT, error="the job's timeout passed")
                    await self._cleanup(job.job_id)
                    return
            messages = await queue.receive(
                max_messages=1, visibility_timeout=self.cfg.visibility_timeout, wait=RECEIVE_WAIT
            )
            for message in messages:
                await self._batch(job, queue, handler, message)
            if messages:
                continue
            await self._dead_letters(job, queue)
            if await self._finish(job, handler):
                return

    # -- batches -----------------------------------------------------------------------------

    async def _items(self, job: Job, body: dict[str, Any]) -> list[Any]:
        if "items" in body:
            return list(body["items"])
        blob = await self.jobs.store.get(body["key"])
        if blob is None:
            raise WorkError(f"the items of batch {body['i']} are gone ({body['key']})")
        return list(json.loads(blob.body))

    async def _batch(self, job: Job, queue: Queue, handler: Handler, message: Message) -> None:
        body = json.loads(message.body)
        index, batch_id, attempt = int(body["i"]), str(body["b"]), message.receive_count
        # a redelivery may be of a batch that ended (its worker died before the delete)
        found = await self.jobs.outcome(job.job_id, index) if attempt > 1 else None
        if found is not None:
            await self.jobs.record(job.job_id, found)
            await queue.delete(message)
            return
        items = await self._items(job, body)
        started = time.monotonic()
        error = ""
        try:
            async with holding(queue, message, visibility_timeout=self.cfg.visibility_timeout):
                span = _span(job, "handle_batch", batch_id=batch_id, attempt=attempt)
                await handler.handle_batch(items, batch_id, span)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.shield(queue.release(message))
            raise
        except Exception as exc:  # the handler's own error: this run failed
            error = _error(exc)
            log.error(
                "batch_failed",
                batch_id=batch_id,
                index=index,
                attempt=attempt,
                error=error,
                trace="".join(traceback.format_exception(exc))[-4000:],
            )
        seconds = time.monotonic() - started
        BATCH_SECONDS.labels(self.api.name, job.job_id).observe(seconds)
        if error and job.dead_letter is not None and attempt < job.dead_letter:
            await queue.release(message)  # runs again, on whichever worker receives it first
            return
        outcome = Outcome(
            index,
            batch_id,
            ok=not error,
            attempts=attempt,
            at=time.time(),
            seconds=seconds,
            error=error,
            dead_lettered=bool(error) and job.dead_letter is not None,
            items=items if error else None,
        )
        standing = await self.jobs.record(job.job_id, outcome)
        if standing is outcome:
            BATCHES.labels(self.api.name, job.job_id, "succeeded" if outcome.ok else "failed").inc()
        await queue.delete(message)

    async def _dead_letters(self, job: Job, queue: Queue) -> None:
        """Records the batches whose every run was lost (their worker died each time)."""
        dead = queue.dead
        while dead is not None:
            messages = await dead.receive(max_messages=10, visibility_timeout=60)
            if not messages:
                return
            for message in messages:
                body = json.loads(message.body)
                outcome = Outcome(
                    int(body["i"]),
                    str(body["b"]),
                    ok=False,
                    attempts=job.max_runs,
                    at=time.time(),
                    error=(
                        f"no run of the batch finished in {job.max_runs} runs (the worker "
                        "running it died, or its lease lapsed, each time)"
                    ),
                    dead_lettered=job.dead_letter is not None,
                    items=await self._items(job, body),
                )
                if await self.jobs.record(job.job_id, outcome) is outcome:
                    BATCHES.labels(self.api.name, job.job_id, "failed").inc()
                await dead.delete(message)

    # -- the end -----------------------------------------------------------------------------

    async def _finish(self, job: Job, handler: Handler) -> bool:
        """When every batch has an outcome: the one worker whose hook claim stands runs the
        hook and ends the job. True once the job has ended."""
        ended, failed = await self.jobs.counts(job.job_id)
        if ended < job.total_batch_count:
            return False
        if not await self.jobs.claim_hook(job.job_id, self.owner):
            current = await self.jobs.get(job.job_id)
            if current is None or current.ended:
                return True
            reaped = await self.jobs.reap_hook(job.job_id, stale_after=self.cfg.visibility_timeout)
            if reaped is not None and reaped.ended:
                await self._cleanup(job.job_id)
                return True
            return False
        status = COMPLETED_WITH_FAILURES if failed else SUCCEEDED
        if handler.hook is None:
            await self.jobs.end(job.job_id, status, hook=HOOK_ABSENT)
        else:
            await self.jobs.update(job.job_id, lambda j: replace(j, hook=HOOK_RUNNING))
            error = await self._run_hook(job, handler)
            if error:
                await self.jobs.end(
                    job.job_id,
                    WORKER_ERROR,
                    hook=HOOK_FAILED,
                    hook_error=error,
                    error=f"the completion hook raised {error}",
                )
            else:
                await self.jobs.end(job.job_id, status, hook=HOOK_SUCCEEDED)
        await self._cleanup(job.job_id)
        return True

    async def _run_hook(self, job: Job, handler: Handler) -> str:
        """Runs the hook, renewing the claim meanwhile; the hook's error ("" when it returned)."""

        async def renew() -> None:
            while True:
                await asyncio.sleep(self.cfg.visibility_timeout / 3)
                await self.jobs.set_hook(
                    job.job_id,
                    lambda h: (
                        replace(h, renewed_at=time.time()) if h.state == HOOK_RUNNING else None
                    ),
                )

        keeper = asyncio.create_task(renew())
        error = ""
        try:
            await handler.on_job_complete(_span(job, "on_job_complete"))
        except Exception as exc:  # the handler's own error: the job's WORKER_ERROR
            error = _error(exc)
            log.error("batch_hook_failed", error=error, trace=traceback.format_exc()[-4000:])
        finally:
            keeper.cancel()
            await asyncio.wait([keeper])
        state = HOOK_FAILED if error else HOOK_SUCCEEDED
        await self.jobs.set_hook(job.job_id, lambda h: replace(h, state=state, error=error))
        return error

    async def _cleanup(self, job_id: str) -> None:
        await drop_job(self.work, self.jobs, job_id)


def _span(job: Job, name: str, **attributes: Any) -> tracing.Client | None:
    """With tracing on, the span of one handler call of the job: a trace of its own, linked to
    the SubmitJob call's span."""
    traced = tracing.active()
    if traced is None:
        return None
    named = {f"modelmux.{key}": value for key, value in attributes.items()}
    return traced.linked(
        name, job.traceparent, {"modelmux.api": job.api, "modelmux.job_id": job.job_id, **named}
    )


# -- the process -------------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> Config:
    if args.snapshot:
        with open(args.snapshot, "rb") as fh:
            config: Config = pickle.load(fh)
            return config
    if not args.config:
        raise SystemExit("modelmux worker: --config is required")
    return load(args.config, daemon="gateway")


async def _run(config: Config, api: ApiConfig, args: argparse.Namespace) -> None:
    assert api.batch_config is not None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    work = await open_work(config, api.batch_config)
    worker = BatchWorker(config, api, gateway=args.gateway or config.gateway.listen, work=work)
    main = asyncio.create_task(worker.run_job(args.job) if args.job else worker.serve(stop))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({main, stopping}, return_when=asyncio.FIRST_COMPLETED)
    for task in (main, stopping):
        task.cancel()
    await asyncio.wait({main, stopping})
    await work.close()


def main(args: argparse.Namespace) -> int:
    config = _config(args)
    logs.configure(
        level=config.gateway.log_level, component="batch-worker", fields={"api": args.api}
    )
    api = next((a for a in config.apis if a.name == args.api), None)
    if api is None or api.batch_config is None:
        names = [a.name for a in config.apis if a.batch_config is not None]
        print(
            f"modelmux worker: no BatchAPI with a handler named {args.api!r} "
            f"(BatchAPIs: {', '.join(names) or 'none'})",
            file=sys.stderr,
        )
        return 2
    metrics = (
        Endpoint(args.metrics_listen, "", key="worker --metrics-listen")
        if args.metrics_listen
        else None
    )
    try:
        tracing.setup(configured=config.gateway.tracing, service="modelmux-batch-worker")
    except tracing.TracingError as exc:
        print(f"modelmux worker: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_run(config, api, args))
    finally:
        if metrics is not None:
            metrics.close()
        tracing.shutdown()  # exports the spans still buffered
    log.info("batch_worker_stopped", pid=os.getpid())
    sys.stderr.flush()
    os._exit(0)  # a handler thread still running a batch must not keep the process alive


if __name__ == "__main__":
    supervision.watch_parent()
    from modelmux_common.cli import batch_worker_options

    _parser = argparse.ArgumentParser(prog="modelmux worker")
    batch_worker_options(_parser)
    sys.exit(main(_parser.parse_args()))
