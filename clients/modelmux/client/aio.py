"""The asyncio face: ``AsyncClient``, the same methods as ``Client``, awaited."""

from __future__ import annotations

import itertools
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

import grpc
import numpy.typing as npt
from grpc_health.v1 import health_pb2

from modelmux.client import calls, jobs
from modelmux.client.errors import from_rpc_error
from modelmux.client.options import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT,
    ChannelOption,
    RetryPolicy,
    Settings,
    Tls,
)
from modelmux.v1 import (
    async_pb2,
    async_pb2_grpc,
    inference_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
)

Reply = TypeVar("Reply")
Update = TypeVar("Update")
_DEFAULT_RETRY = RetryPolicy()


class _Stubs:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.inference = inference_pb2_grpc.InferenceStub(channel)
        self.models = models_pb2_grpc.ModelsStub(channel)
        self.asyncs = async_pb2_grpc.AsyncStub(channel)
        self.jobs = jobs_pb2_grpc.JobsStub(channel)
        # grpc_health's stub has no type stubs for its methods: the same call, declared here.
        self.health_check = channel.unary_unary(
            calls.HEALTH_CHECK,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )


def open_channel(settings: Settings) -> grpc.aio.Channel:
    options = settings.channel_options()
    if settings.tls is None:
        return grpc.aio.insecure_channel(settings.target, options=options)
    return grpc.aio.secure_channel(settings.target, settings.tls.credentials(), options=options)


class AsyncClient:
    """An asyncio modelmux client, with the arguments and methods of ``Client``.

    Build it inside the event loop that uses it, and ``await client.close()`` (or use
    ``async with``) when done.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = _DEFAULT_RETRY,
        tls: Tls | None = None,
        channels: int = 1,
        wait_for_ready: bool = False,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        metadata: Sequence[tuple[str, str]] = (),
        options: Sequence[ChannelOption] = (),
    ) -> None:
        self.settings = Settings(
            target=target,
            timeout=timeout,
            retry=retry,
            tls=tls,
            channels=channels,
            wait_for_ready=wait_for_ready,
            max_message_bytes=max_message_bytes,
            metadata=tuple(metadata),
            options=tuple(options),
        )
        self._pool = [_Stubs(open_channel(self.settings)) for _ in range(channels)]
        self._next = itertools.cycle(self._pool)

    async def _call(
        self,
        method: Callable[..., Awaitable[Reply]],
        request: Any,
        timeout: float | None,
    ) -> Reply:
        try:
            return await method(
                request,
                timeout=self.settings.call_timeout(timeout),
                metadata=self.settings.metadata or None,
                wait_for_ready=self.settings.wait_for_ready,
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc

    def _open(self, method: Callable[..., Any], request: Any, timeout: float | None) -> Any:
        """A server stream: no deadline unless ``timeout`` is given."""
        return method(
            request,
            timeout=timeout,
            metadata=self.settings.metadata or None,
            wait_for_ready=self.settings.wait_for_ready,
        )

    async def predict(
        self,
        model: str,
        inputs: Mapping[str, npt.ArrayLike],
        *,
        version: int | None = None,
        label: str | None = None,
        signature: str = "",
        output_filter: Sequence[str] = (),
        timeout: float | None = None,
    ) -> calls.Prediction:
        """Runs ``model`` (latest, or ``version``, or the version ``label`` points at)."""
        request = calls.predict_request(
            model,
            inputs,
            version=version,
            label=label,
            signature=signature,
            output_filter=tuple(output_filter),
        )
        reply = await self._call(next(self._next).inference.Predict, request, timeout)
        return calls.prediction(reply)

    async def invoke(
        self,
        api: str,
        payload: calls.Payload = None,
        *,
        query_params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> calls.Payload:
        """Calls an API's handler with a JSON value or raw bytes; returns what it returned."""
        request = calls.invoke_request(api, payload, query_params=query_params, headers=headers)
        reply = await self._call(next(self._next).inference.Invoke, request, timeout)
        return calls.invoke_result(reply)

    async def list_models(self, *, timeout: float | None = None) -> list[models_pb2.Model]:
        """Every model the gateway knows, with versions, labels, state and reason."""
        stub = next(self._next).models
        return calls.models(
            await self._call(stub.ListModels, models_pb2.ListModelsRequest(), timeout)
        )

    async def get_model(self, name: str, *, timeout: float | None = None) -> models_pb2.Model:
        """One model; NotFoundError when the gateway does not know it."""
        request = models_pb2.GetModelRequest(name=name)
        return (await self._call(next(self._next).models.GetModel, request, timeout)).model

    async def watch_models(
        self, models: Sequence[str] = (), *, timeout: float | None = None
    ) -> AsyncGenerator[models_pb2.WatchModelsResponse, None]:
        """Every model as it is now, then one update per change, until the iterator is closed
        (``aclose()``, or leaving an ``async for``/``aclosing`` block) or ``timeout`` passes."""
        stream = next(self._next).models.WatchModels(
            models_pb2.WatchModelsRequest(models=list(models)),
            timeout=timeout,
            metadata=self.settings.metadata or None,
            wait_for_ready=self.settings.wait_for_ready,
        )
        try:
            async for update in stream:
                yield update
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise from_rpc_error(exc) from exc
        finally:
            stream.cancel()

    async def health(
        self, service: str = "", *, timeout: float | None = None
    ) -> calls.HealthStatus:
        """grpc.health.v1 status of the gateway ("") or of one model
        (``"modelmux.v1.Model/<name>"``); NotFoundError for a service it does not know."""
        request = health_pb2.HealthCheckRequest(service=service)
        reply = await self._call(next(self._next).health_check, request, timeout)
        return calls.health_status(reply)

    # -- async requests (modelmux.v1.Async) ----------------------------------------------------

    async def submit(
        self,
        api: str,
        payload: calls.Payload = None,
        *,
        content_type: str = "application/octet-stream",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> str:
        """Queues a request for an AsyncAPI's handle_async; returns its id once it is stored.
        Without ``request_id`` the client makes one, so that a retried call is the same request."""
        request = calls.submit_request(
            api, payload, content_type=content_type, request_id=request_id
        )
        return (await self._call(next(self._next).asyncs.Submit, request, timeout)).id

    async def get(
        self, request_id: str, *, api: str = "", timeout: float | None = None
    ) -> calls.AsyncRequest:
        """The request's state, and its result or error once it ended."""
        request = async_pb2.GetRequest(api=api, id=request_id)
        reply = await self._call(next(self._next).asyncs.Get, request, timeout)
        return calls.async_request(reply.request)

    def watch(
        self, request_id: str, *, api: str = "", timeout: float | None = None
    ) -> AsyncGenerator[calls.AsyncRequest, None]:
        """The request now, then at each change; ends after its terminal state."""
        request = async_pb2.WatchRequest(api=api, id=request_id)
        return _updates(
            lambda: self._open(next(self._next).asyncs.Watch, request, timeout),
            lambda update: calls.async_request(update.request),
        )

    async def cancel(
        self, request_id: str, *, api: str = "", timeout: float | None = None
    ) -> calls.AsyncRequest:
        """Cancels a request that has not ended (FailedPreconditionError once it has)."""
        request = async_pb2.CancelRequest(api=api, id=request_id)
        reply = await self._call(next(self._next).asyncs.Cancel, request, timeout)
        return calls.async_request(reply.request)

    async def list_requests(
        self,
        api: str,
        *,
        states: Sequence[str] = (),
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> tuple[list[calls.AsyncRequest], str]:
        """One page of an API's requests (no results) and the token of the next ("" at the end)."""
        request = calls.list_request(api, states=states, page_size=page_size, page_token=page_token)
        return calls.async_page(await self._call(next(self._next).asyncs.List, request, timeout))

    # -- batch jobs (modelmux.v1.Jobs) -----------------------------------------------------------

    @overload
    async def submit_job(
        self,
        api: str,
        *,
        workers: int,
        items: Sequence[calls.JsonValue] | None = None,
        files: Sequence[str] = (),
        ndjson: Sequence[str] = (),
        batch_size: int = 1,
        includes: Sequence[str] = (),
        excludes: Sequence[str] = (),
        config: Mapping[str, calls.JsonValue] | None = None,
        job_timeout: float | None = None,
        max_receive_count: int | None = None,
        dry_run: Literal[False] = False,
        timeout: float | None = None,
    ) -> jobs.Job: ...

    @overload
    async def submit_job(
        self,
        api: str,
        *,
        workers: int,
        items: Sequence[calls.JsonValue] | None = None,
        files: Sequence[str] = (),
        ndjson: Sequence[str] = (),
        batch_size: int = 1,
        includes: Sequence[str] = (),
        excludes: Sequence[str] = (),
        config: Mapping[str, calls.JsonValue] | None = None,
        job_timeout: float | None = None,
        max_receive_count: int | None = None,
        dry_run: Literal[True],
        timeout: float | None = None,
    ) -> jobs.DryRun: ...

    async def submit_job(
        self,
        api: str,
        *,
        workers: int,
        items: Sequence[calls.JsonValue] | None = None,
        files: Sequence[str] = (),
        ndjson: Sequence[str] = (),
        batch_size: int = 1,
        includes: Sequence[str] = (),
        excludes: Sequence[str] = (),
        config: Mapping[str, calls.JsonValue] | None = None,
        job_timeout: float | None = None,
        max_receive_count: int | None = None,
        dry_run: bool = False,
        timeout: float | None = None,
    ) -> jobs.Job | jobs.DryRun:
        """Submits a job to a BatchAPI over exactly one source: ``items`` (JSON values),
        ``files`` (each item a file path) or ``ndjson`` (each line an item), the last two s3://
        prefixes or absolute local folders. Returns the job (ENQUEUING) at once; with
        ``dry_run`` what it would process instead. ``job_timeout`` (seconds) ends it TIMED_OUT;
        ``max_receive_count`` retries a failing batch that many runs before dead-lettering it."""
        request = jobs.submit_job_request(
            api,
            workers=workers,
            items=items,
            files=files,
            ndjson=ndjson,
            batch_size=batch_size,
            includes=includes,
            excludes=excludes,
            config=config,
            job_timeout=job_timeout,
            max_receive_count=max_receive_count,
            dry_run=dry_run,
        )
        return jobs.submitted(await self._call(next(self._next).jobs.SubmitJob, request, timeout))

    async def get_job(
        self, job_id: str, *, api: str = "", timeout: float | None = None
    ) -> jobs.Job:
        """The job's status, batch counts, times and errors."""
        request = jobs_pb2.GetJobRequest(api=api, job_id=job_id)
        return jobs.job((await self._call(next(self._next).jobs.GetJob, request, timeout)).job)

    async def list_jobs(
        self,
        api: str = "",
        *,
        statuses: Sequence[str] = (),
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> tuple[list[jobs.Job], str]:
        """One page of jobs (an API's, or every BatchAPI's), newest first, and the next page's
        token ("" at the end)."""
        request = jobs.list_jobs_request(
            api, statuses=statuses, page_size=page_size, page_token=page_token
        )
        return jobs.jobs_page(await self._call(next(self._next).jobs.ListJobs, request, timeout))

    def watch_job(
        self, job_id: str, *, api: str = "", timeout: float | None = None
    ) -> AsyncGenerator[jobs.Job, None]:
        """The job now, then at each change of status or counts; ends after its final status."""
        request = jobs_pb2.WatchJobRequest(api=api, job_id=job_id)
        return _updates(
            lambda: self._open(next(self._next).jobs.WatchJob, request, timeout),
            lambda update: jobs.job(update.job),
        )

    async def stop_job(
        self, job_id: str, *, api: str = "", timeout: float | None = None
    ) -> jobs.Job:
        """Stops a job (STOPPED; FailedPreconditionError once it has ended)."""
        request = jobs_pb2.StopJobRequest(api=api, job_id=job_id)
        return jobs.job((await self._call(next(self._next).jobs.StopJob, request, timeout)).job)

    async def failed_batches(
        self,
        job_id: str,
        *,
        api: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> tuple[list[jobs.FailedBatch], str]:
        """One page of a job's failed batches (id, attempts, error, items), in batch order, and
        the next page's token ("" at the end)."""
        request = jobs_pb2.ListFailedBatchesRequest(
            api=api, job_id=job_id, page_size=page_size, page_token=page_token
        )
        return jobs.failed_page(
            await self._call(next(self._next).jobs.ListFailedBatches, request, timeout)
        )

    async def close(self) -> None:
        for stubs in self._pool:
            await stubs.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def _updates(
    open_stream: Callable[[], Any], read: Callable[[Any], Update]
) -> AsyncGenerator[Update, None]:
    """A stream's messages, each read into what the client returns; its errors as ours. The
    stream opens when the first message is asked for."""
    stream = open_stream()
    try:
        async for update in stream:
            yield read(update)
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from exc
    finally:
        stream.cancel()
