"""The blocking face: ``Client``. Each method is one gRPC call through ``calls``."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Generator, Mapping, Sequence
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
    """The stubs of one channel."""

    def __init__(self, channel: grpc.Channel) -> None:
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


def open_channel(settings: Settings) -> grpc.Channel:
    options = settings.channel_options()
    if settings.tls is None:
        return grpc.insecure_channel(settings.target, options=options)
    return grpc.secure_channel(settings.target, settings.tls.credentials(), options=options)


class Client:
    """A blocking modelmux client; thread-safe, meant to be shared and closed once.

    ``target`` is what gRPC dials: ``host:port``, ``unix:/path`` (a sidecar's socket),
    ``dns:///name:port``. Every call gets ``timeout`` seconds unless it passes its own;
    UNAVAILABLE is retried with backoff per ``retry`` (``None``: never). ``channels`` > 1 opens
    that many connections and spreads calls over them (for ``gateway.workers`` > 1).
    ``metadata`` goes with every call (e.g. ``("authorization", "Bearer ...")``); ``options``
    are raw gRPC channel arguments that win over the client's own.
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
        self._lock = threading.Lock()

    def _stubs(self) -> _Stubs:
        with self._lock:
            return next(self._next)

    def _call(
        self,
        method: Callable[..., Reply],
        request: Any,
        timeout: float | None,
    ) -> Reply:
        try:
            return method(
                request,
                timeout=self.settings.call_timeout(timeout),
                metadata=self.settings.metadata or None,
                wait_for_ready=self.settings.wait_for_ready,
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    def _open(self, method: Callable[..., Any], request: Any, timeout: float | None) -> Any:
        """A server stream: no deadline unless ``timeout`` is given."""
        return method(
            request,
            timeout=timeout,
            metadata=self.settings.metadata or None,
            wait_for_ready=self.settings.wait_for_ready,
        )

    def predict(
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
        return calls.prediction(self._call(self._stubs().inference.Predict, request, timeout))

    def invoke(
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
        return calls.invoke_result(self._call(self._stubs().inference.Invoke, request, timeout))

    def list_models(self, *, timeout: float | None = None) -> list[models_pb2.Model]:
        """Every model the gateway knows, with versions, labels, state and reason."""
        reply = self._call(self._stubs().models.ListModels, models_pb2.ListModelsRequest(), timeout)
        return calls.models(reply)

    def get_model(self, name: str, *, timeout: float | None = None) -> models_pb2.Model:
        """One model; NotFoundError when the gateway does not know it."""
        request = models_pb2.GetModelRequest(name=name)
        return self._call(self._stubs().models.GetModel, request, timeout).model

    def watch_models(
        self, models: Sequence[str] = (), *, timeout: float | None = None
    ) -> Generator[models_pb2.WatchModelsResponse, None, None]:
        """Every model as it is now, then one update per change, until the generator is closed
        (``close()``, ``contextlib.closing``) or ``timeout`` passes: a watch has no deadline
        unless given one."""
        request = models_pb2.WatchModelsRequest(models=list(models))
        stream = self._stubs().models.WatchModels(
            request,
            timeout=timeout,
            metadata=self.settings.metadata or None,
            wait_for_ready=self.settings.wait_for_ready,
        )
        return _watch(stream)

    def health(self, service: str = "", *, timeout: float | None = None) -> calls.HealthStatus:
        """grpc.health.v1 status of the gateway ("") or of one model
        (``"modelmux.v1.Model/<name>"``); NotFoundError for a service it does not know."""
        request = health_pb2.HealthCheckRequest(service=service)
        return calls.health_status(self._call(self._stubs().health_check, request, timeout))

    # -- async requests (modelmux.v1.Async) ----------------------------------------------------

    def submit(
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
        return self._call(self._stubs().asyncs.Submit, request, timeout).id

    def get(
        self, request_id: str, *, api: str = "", timeout: float | None = None
    ) -> calls.AsyncRequest:
        """The request's state, and its result or error once it ended."""
        request = async_pb2.GetRequest(api=api, id=request_id)
        return calls.async_request(self._call(self._stubs().asyncs.Get, request, timeout).request)

    def watch(
        self, request_id: str, *, api: str = "", timeout: float | None = None
    ) -> Generator[calls.AsyncRequest, None, None]:
        """The request now, then at each change; ends after its terminal state."""
        request = async_pb2.WatchRequest(api=api, id=request_id)
        return _updates(
            lambda: self._open(self._stubs().asyncs.Watch, request, timeout),
            lambda update: calls.async_request(update.request),
        )

    def cancel(
        self, request_id: str, *, api: str = "", timeout: float | None = None
    ) -> calls.AsyncRequest:
        """Cancels a request that has not ended (FailedPreconditionError once it has)."""
        request = async_pb2.CancelRequest(api=api, id=request_id)
        reply = self._call(self._stubs().asyncs.Cancel, request, timeout)
        return calls.async_request(reply.request)

    def list_requests(
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
        return calls.async_page(self._call(self._stubs().asyncs.List, request, timeout))

    # -- batch jobs (modelmux.v1.Jobs) -----------------------------------------------------------

    @overload
    def submit_job(
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
    def submit_job(
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

    def submit_job(
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
        return jobs.submitted(self._call(self._stubs().jobs.SubmitJob, request, timeout))

    def get_job(self, job_id: str, *, api: str = "", timeout: float | None = None) -> jobs.Job:
        """The job's status, batch counts, times and errors."""
        request = jobs_pb2.GetJobRequest(api=api, job_id=job_id)
        return jobs.job(self._call(self._stubs().jobs.GetJob, request, timeout).job)

    def list_jobs(
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
        return jobs.jobs_page(self._call(self._stubs().jobs.ListJobs, request, timeout))

    def watch_job(
        self, job_id: str, *, api: str = "", timeout: float | None = None
    ) -> Generator[jobs.Job, None, None]:
        """The job now, then at each change of status or counts; ends after its final status."""
        request = jobs_pb2.WatchJobRequest(api=api, job_id=job_id)
        return _updates(
            lambda: self._open(self._stubs().jobs.WatchJob, request, timeout),
            lambda update: jobs.job(update.job),
        )

    def stop_job(self, job_id: str, *, api: str = "", timeout: float | None = None) -> jobs.Job:
        """Stops a job (STOPPED; FailedPreconditionError once it has ended)."""
        request = jobs_pb2.StopJobRequest(api=api, job_id=job_id)
        return jobs.job(self._call(self._stubs().jobs.StopJob, request, timeout).job)

    def failed_batches(
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
        return jobs.failed_page(self._call(self._stubs().jobs.ListFailedBatches, request, timeout))

    def close(self) -> None:
        for stubs in self._pool:
            stubs.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _updates(
    open_stream: Callable[[], Any], read: Callable[[Any], Update]
) -> Generator[Update, None, None]:
    """A stream's messages, each read into what the client returns; its errors as ours. The
    stream opens when the first message is asked for."""
    stream = open_stream()
    try:
        for update in stream:
            yield read(update)
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from exc
    finally:
        stream.cancel()


def _watch(stream: Any) -> Generator[models_pb2.WatchModelsResponse, None, None]:
    try:
        yield from stream
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.CANCELLED:
            raise from_rpc_error(exc) from exc
    finally:
        stream.cancel()
