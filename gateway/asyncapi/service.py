"""The modelmux.v1.Async service and what it runs on: every AsyncAPI's store, queue, runner.

APIs with the same store settings share one work backend (one SQLite database, or one bucket and
queue prefix); each API has its own queue, ``async-<api>``, with a dead-letter queue after
``async.max_attempts`` receives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import structlog
from google.protobuf import json_format

from gateway.asyncapi import payloads
from gateway.asyncapi.records import CANCELLED, TERMINAL, Record, Requests, Status
from gateway.asyncapi.runner import OUTCOMES, Runner, Sweeper
from gateway.errors import FailedPrecondition, InvalidArgument, NotFound, parse, shown
from gateway.handlers.pool import Handlers
from gateway.tensors import from_value
from gateway.work import Work, open_configured, queue_name
from modelmux.v1 import async_pb2
from modelmux_common import tracing
from modelmux_common.config import ApiConfig, AsyncConfig, Config

log = structlog.get_logger("modelmux.async")

SERVICE = async_pb2.DESCRIPTOR.services_by_name["Async"].full_name
# How often a Watch reads the store for changes made by other gateways (changes made by this one
# wake it at once).
WATCH_POLL = 1.0
STATES = {
    async_pb2.ASYNC_STATE_IN_QUEUE: "IN_QUEUE",
    async_pb2.ASYNC_STATE_IN_PROGRESS: "IN_PROGRESS",
    async_pb2.ASYNC_STATE_COMPLETED: "COMPLETED",
    async_pb2.ASYNC_STATE_FAILED: "FAILED",
    async_pb2.ASYNC_STATE_CANCELLED: "CANCELLED",
}
STATE_NUMBERS = {name: number for number, name in STATES.items()}


def _store_key(config: Config, cfg: AsyncConfig) -> tuple[str, ...]:
    if cfg.store == "aws":
        return ("aws", cfg.bucket, cfg.prefix, cfg.queue_prefix, cfg.region, cfg.endpoint_url)
    return ("embedded", cfg.folder or os.path.join(config.gateway.state_dir, "async"))


class AsyncApis:
    """Every AsyncAPI of the config; the Async RPCs."""

    def __init__(self, config: Config, handlers: Handlers) -> None:
        self.config = config
        self.handlers = handlers
        self.apis: dict[str, ApiConfig] = {
            a.name: a for a in config.apis if a.kind == "AsyncAPI" and a.async_config
        }
        self.requests: dict[str, Requests] = {}
        self.runners: list[Runner] = []
        self.works: list[Work] = []
        self.sweepers: list[Sweeper] = []
        self._waiters: dict[tuple[str, str], set[asyncio.Event]] = {}

    async def start(self) -> None:
        groups: dict[tuple[str, ...], list[ApiConfig]] = {}
        for api in self.apis.values():
            assert api.async_config is not None
            groups.setdefault(_store_key(self.config, api.async_config), []).append(api)
        for key, apis in groups.items():
            cfg = apis[0].async_config
            assert cfg is not None
            work = await open_configured(cfg, key[1] if key[0] == "embedded" else "")
            self.works.append(work)
            members = []
            for api in apis:
                acfg = api.async_config
                assert acfg is not None
                queue = await work.queue(
                    queue_name("async", api.name), max_receive_count=acfg.max_attempts
                )
                requests = Requests(
                    api.name,
                    work=work,
                    queue=queue,
                    config=acfg,
                    notify=self._notify,
                )
                self.requests[api.name] = requests
                members.append(requests)
                runner = Runner(requests, queue, self.handlers.pools[api.name], acfg)
                runner.start()
                self.runners.append(runner)
            sweeper = Sweeper(work.store, members, exact_age=key[0] != "aws")
            sweeper.start(every=5.0)
            self.sweepers.append(sweeper)
            log.info("async_apis", store=key[0], apis=[a.name for a in apis])

    async def close(self) -> None:
        grace = self.config.gateway.shutdown_grace
        await asyncio.gather(*(r.close(grace) for r in self.runners))
        await asyncio.gather(*(s.close() for s in self.sweepers))
        await asyncio.gather(*(w.close() for w in self.works))

    # -- notifications (Watch) ----------------------------------------------------------------

    def _notify(self, status: Status) -> None:
        for event in self._waiters.get((status.api, status.id), ()):
            event.set()

    @contextlib.contextmanager
    def _waiting(self, api: str, request_id: str) -> Any:
        event = asyncio.Event()
        key = (api, request_id)
        self._waiters.setdefault(key, set()).add(event)
        try:
            yield event
        finally:
            waiters = self._waiters.get(key, set())
            waiters.discard(event)
            if not waiters:
                self._waiters.pop(key, None)

    # -- lookups ------------------------------------------------------------------------------

    def _api(self, name: str) -> Requests:
        if not name:
            raise InvalidArgument("api is required")
        requests = self.requests.get(name)
        if requests is not None:
            return requests
        other = next((a for a in self.config.apis if a.name == name), None)
        if other is not None:
            raise FailedPrecondition(
                f"API {name!r} is a {other.kind}, not an AsyncAPI"
                + (": call it with modelmux.v1.Inference/Invoke" if other.handler_path else "")
            )
        raise NotFound(
            f"no API named {shown(name)} (AsyncAPIs: {', '.join(self.requests) or 'none'})"
        )

    @staticmethod
    def _id(request_id: str) -> str:
        if not request_id:
            raise InvalidArgument("id is required")
        problem = payloads.check_id(request_id)
        if problem:
            raise InvalidArgument(f"id {shown(request_id)} is not a request id: {problem}")
        return request_id

    async def _find(self, api: str, request_id: str) -> Requests:
        """The API holding the request: ``api`` itself, or when empty the one AsyncAPI that
        knows the id."""
        self._id(request_id)
        if api:
            return self._api(api)
        found = await asyncio.gather(*(r.status(request_id) for r in self.requests.values()))
        holders = [r for r, s in zip(self.requests.values(), found, strict=True) if s is not None]
        if len(holders) > 1:
            names = ", ".join(r.api for r in holders)
            raise FailedPrecondition(f"request {request_id} exists in APIs {names}: give api")
        if not holders:
            raise NotFound(
                f"no request {shown(request_id)} in any AsyncAPI "
                f"({', '.join(self.requests) or 'none'})"
            )
        return holders[0]

    # -- the RPCs -----------------------------------------------------------------------------

    async def submit(self, data: bytes, context: Any, call: Any) -> bytes:
        request = parse(async_pb2.SubmitRequest, data)
        requests = self._api(request.api)
        request_id = self._id(request.id) if request.id else payloads.new_id()
        call.model = request.api
        kind = request.WhichOneof("payload")
        if kind == "json":
            body = json.dumps(from_value(request.json), separators=(",", ":")).encode()
            content_type = payloads.JSON
        else:
            body = request.raw if kind == "raw" else b""
            content_type = request.content_type or payloads.OCTETS
            problem = payloads.check_content_type(content_type)
            if problem:  # (it was accepted, then every run of it crashed passing it on)
                raise InvalidArgument(f"content_type {shown(content_type)}: {problem}")
            try:
                payloads.decode(body, content_type)
            except (ValueError, UnicodeDecodeError) as exc:
                raise InvalidArgument(
                    f"raw payload is not valid {payloads.media_type(content_type)}: {exc}"
                ) from None
        traced = tracing.active()
        traceparent = "" if traced is None else traced.traceparent(call.span)
        created = await requests.submit(request_id, body, content_type, traceparent=traceparent)
        return async_pb2.SubmitResponse(id=request_id, created=created).SerializeToString()

    async def get(self, data: bytes, context: Any, call: Any) -> bytes:
        request = parse(async_pb2.GetRequest, data)
        requests = await self._find(request.api, request.id)
        record = await requests.get(request.id)
        return async_pb2.GetResponse(request=_message(record)).SerializeToString()

    async def cancel(self, data: bytes, context: Any, call: Any) -> bytes:
        request = parse(async_pb2.CancelRequest, data)
        requests = await self._find(request.api, request.id)
        status = await requests.cancel(request.id)
        OUTCOMES.labels(requests.api, CANCELLED).inc()
        return async_pb2.CancelResponse(request=_message(Record(status))).SerializeToString()

    async def list(self, data: bytes, context: Any, call: Any) -> bytes:
        request = parse(async_pb2.ListRequest, data)
        requests = self._api(request.api)
        size = request.page_size or 100
        if not 1 <= size <= 1000:
            raise InvalidArgument(f"page_size {size}: expected 1 to 1000")
        states = set()
        for number in request.states:
            if number not in STATES:
                raise InvalidArgument(f"states: {number} is not an AsyncState")
            states.add(STATES[number])
        try:
            found, token = await requests.page(states=states, size=size, token=request.page_token)
        except ValueError:
            raise InvalidArgument("page_token is not one this API's List returned") from None
        reply = async_pb2.ListResponse(
            requests=[_message(Record(s)) for s in found], next_page_token=token
        )
        return reply.SerializeToString()

    async def watch(self, data: bytes, context: Any) -> AsyncIterator[bytes]:
        request = parse(async_pb2.WatchRequest, data)
        requests = await self._find(request.api, request.id)
        last: tuple[str, int] | None = None
        with self._waiting(requests.api, request.id) as event:
            while True:
                event.clear()
                record = await requests.get(request.id)
                now = (record.status.state, record.status.attempts)
                if now != last:
                    last = now
                    message = async_pb2.WatchResponse(request=_message(record))
                    yield message.SerializeToString()
                if record.status.state in TERMINAL:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), WATCH_POLL)


def _message(record: Record) -> async_pb2.AsyncRequest:
    status = record.status
    out = async_pb2.AsyncRequest(
        id=status.id,
        api=status.api,
        state=STATE_NUMBERS[status.state],
        attempts=status.attempts,
        error=status.error,
    )
    for name in ("submitted_at", "started_at", "finished_at", "expires_at"):
        value = getattr(status, name)
        if value is not None:
            getattr(out, name).FromNanoseconds(int(value * 1e9))
    result = record.result
    if result is not None:
        if payloads.is_json(result.content_type):
            json_format.Parse(result.body, out.json)
        else:
            out.raw = result.body
    return out
