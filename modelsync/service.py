"""``modelmux.modelsync.v1.ModelSync``: the event stream and the listing, over gRPC."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from modelmux.modelsync.v1 import modelsync_pb2 as pb
from modelmux.modelsync.v1 import modelsync_pb2_grpc as pb_grpc
from modelsync.events import Event, Subscription
from modelsync.syncer import Syncer

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ModelSync"].full_name
# Live events queued per subscriber before it is cut off (it then resumes by revision).
SUBSCRIBER_QUEUE = 10_000


class WatchError(Exception):
    """A WatchEvents stream that cannot go on; mapped to a status in one place."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(round(seconds * 1e9))
    return ts


def event_pb(e: Event) -> pb.Event:
    msg = pb.Event(
        revision=e.revision,
        kind=pb.EventKind.Value(f"EVENT_KIND_{e.kind.value}"),
        model=e.model,
        api=e.api,
        inferentia=e.inferentia,
        digest=e.digest,
        reason=e.reason,
        store_path=e.store_path,
        store_base_path=e.store_base_path,
        previous_store_path=e.previous_store_path,
        source=e.source,
        files=e.files,
        bytes=e.bytes,
        time=timestamp(e.time),
    )
    if e.version is not None:
        msg.version = e.version
    return msg


def published_models(syncer: Syncer) -> list[pb.PublishedModel]:
    store = syncer.store
    models: dict[str, pb.PublishedModel] = {}
    for (name, version), p in sorted(syncer.publisher.published.items()):
        model = models.get(name)
        if model is None:
            model = models[name] = pb.PublishedModel(
                name=name,
                api=p.api,
                inferentia=p.inferentia,
                source=p.source_uri,
                base_path=str(store.target / name),
            )
        model.versions.append(
            pb.PublishedVersion(
                version=version,
                digest=p.digest,
                revision=p.revision,
                store_path=str(store.path(p.store)),
                store_base_path=str(store.path(p.store_base)),
                view_path=str(store.view(name, version)),
                files=len(p.files),
                bytes=p.bytes,
                published_time=timestamp(p.published_at),
            )
        )
    return list(models.values())


def refusals(syncer: Syncer) -> list[pb.Refusal]:
    """Every refusal in force (reported and not cleared), sorted by model, version and reason."""
    out = []
    for runner in syncer.runners:
        spec = runner.spec
        for problem, revision in runner.health.reported.items():
            refusal = pb.Refusal(
                model=problem.model,
                api=spec.api,
                inferentia=spec.inferentia,
                source=spec.uri,
                reason=problem.reason,
                revision=revision,
            )
            if problem.version is not None:
                refusal.version = problem.version
            out.append(refusal)
    return sorted(out, key=_refusal_order)


def _refusal_order(r: pb.Refusal) -> tuple[str, int, str]:
    return (r.model, r.version if r.HasField("version") else -1, r.reason)


def source_statuses(syncer: Syncer) -> list[pb.SourceStatus]:
    out = []
    for runner in sorted(syncer.runners, key=lambda r: r.spec.id):
        health = runner.health
        status = pb.SourceStatus(
            id=runner.spec.id,
            uri=runner.spec.uri,
            api=runner.spec.api,
            healthy=bool(health.healthy),
            error=health.error,
        )
        if health.last_success is not None:
            status.last_success_time.CopyFrom(timestamp(health.last_success))
        out.append(status)
    return out


class ModelSyncService(pb_grpc.ModelSyncServicer):
    def __init__(self, syncer: Syncer, *, queue_limit: int = SUBSCRIBER_QUEUE) -> None:
        self.syncer = syncer
        self.queue_limit = queue_limit
        # this daemon's instance: revisions and refusals are only comparable within one
        self.instance = secrets.token_hex(8)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            revision=self.syncer.events.revision,
            models=published_models(self.syncer),
            sources=source_statuses(self.syncer),
            refused=refusals(self.syncer),
            instance=self.instance,
        )

    async def WatchEvents(
        self, request: pb.WatchEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.WatchEventsResponse]:
        try:
            async for item in self._watch(request.from_revision, request.instance):
                item.instance = self.instance
                yield item
        except WatchError as exc:
            await context.abort(exc.code, str(exc))

    def _start(
        self, from_revision: int, instance: str
    ) -> tuple[list[pb.WatchEventsResponse], Subscription]:
        """The first messages and the live subscription, taken together (no await in between, so
        no event falls between them)."""
        if from_revision < 0:
            raise WatchError(grpc.StatusCode.INVALID_ARGUMENT, "from_revision cannot be negative")
        log = self.syncer.events
        other = bool(instance) and instance != self.instance
        replay = log.after(from_revision) if from_revision > 0 and not other else None
        if replay is not None:
            head = [pb.WatchEventsResponse(event=event_pb(e), replayed=True) for e in replay]
        else:
            if from_revision == 0:
                reason = pb.SNAPSHOT_REASON_INITIAL
            elif other:
                reason = pb.SNAPSHOT_REASON_INSTANCE_CHANGED
            elif from_revision > log.revision:
                reason = pb.SNAPSHOT_REASON_REVISION_UNKNOWN
            else:
                reason = pb.SNAPSHOT_REASON_REVISION_EXPIRED
            snapshot = pb.Snapshot(
                revision=log.revision,
                reason=reason,
                models=published_models(self.syncer),
                sources=source_statuses(self.syncer),
                refused=refusals(self.syncer),
            )
            head = [pb.WatchEventsResponse(snapshot=snapshot)]
        return head, log.subscribe(limit=self.queue_limit)

    async def _watch(
        self, from_revision: int, instance: str = ""
    ) -> AsyncIterator[pb.WatchEventsResponse]:
        head, sub = self._start(from_revision, instance)
        last = self.syncer.events.revision
        try:
            for item in head:
                yield item
            async for event in sub:
                last = event.revision
                yield pb.WatchEventsResponse(event=event_pb(event))
        finally:
            self.syncer.events.unsubscribe(sub)
        if sub.lagged:
            raise WatchError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"subscriber fell {self.queue_limit} events behind; resume from revision {last}",
            )
        raise WatchError(
            grpc.StatusCode.UNAVAILABLE, f"modelsync is shutting down; resume from revision {last}"
        )
