"""Server-side batching: concurrent Predict calls for one model version go to a backend as one call.

An API opts in with ``handler.server_side_batching`` (``max_batch_size``, ``batch_interval``).
Calls are grouped by what the backend must see identically: model, resolved version, signature,
output filter, and each input's name, dtype and shape past the first dimension. A group's calls
are concatenated along the first dimension (the batch dimension) and the backend's outputs split
back by the rows each call sent.

A call for a model with nothing else in flight is forwarded as it came, not even parsed. Otherwise
its group sends a batch at once while it has fewer batches in flight than twice the backends
holding its version, so no call waits for company: batches form only while the backends are busy,
from the calls that queued meanwhile (at most ``max_batch_size`` per batch). With ``batch_interval`` the first call of a
batch waits up to that long for others. A call that cannot be batched (no inputs, a scalar input,
inputs whose first dimensions differ) goes alone; so do the calls of a model whose outputs turn
out not to follow the batch dimension (logged once), and each call of a batch the backend refused
with INVALID_ARGUMENT, so one bad request fails alone.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import structlog

from gateway.errors import ResourceExhausted, parse
from gateway.tensors import proto_to_numpy
from modelmux_common.tfserving import predict_pb2, tensor_pb2

log = structlog.get_logger("modelmux.gateway")

TensorProto = tensor_pb2.TensorProto
Send = Callable[..., Awaitable[bytes]]
_STRING = 7  # DT_STRING
# batches in flight per group and backend: one running, one on the wire
_PER_BACKEND = 2


@dataclass(frozen=True, slots=True)
class Policy:
    max_batch_size: int
    batch_interval: float = 0.0


@dataclass(slots=True)
class _Member:
    data: bytes
    request: Any  # predict_pb2.PredictRequest
    rows: int
    version: int | None
    label: str | None
    context: grpc.aio.ServicerContext[Any, Any]
    call: Any  # gateway.calls.Call
    future: asyncio.Future[bytes]


@dataclass(slots=True)
class _Group:
    model: str
    version: int
    slots: int
    policy: Policy
    queue: list[_Member] = field(default_factory=list)
    inflight: int = 0
    timer: asyncio.TimerHandle | None = None
    expired: bool = False  # the batch interval is over: send what is queued


def rows_of(request: Any) -> int | None:
    """The rows a request sends (every input's first dimension), or None when it cannot be
    batched: no inputs, a scalar, or inputs that disagree on their first dimension."""
    rows = None
    for tensor in request.inputs.values():
        dims = tensor.tensor_shape.dim
        if not dims or dims[0].size < 1 or (rows is not None and dims[0].size != rows):
            return None
        rows = dims[0].size
    return rows


def _key(model: str, version: int, request: Any) -> tuple[Any, ...]:
    inputs = tuple(
        sorted(
            (name, t.dtype, tuple(d.size for d in t.tensor_shape.dim[1:]))
            for name, t in request.inputs.items()
        )
    )
    spec = request.model_spec
    return model, version, spec.signature_name, tuple(request.output_filter), inputs


def concat(tensors: list[Any], out: Any) -> None:
    """Joins tensors along their first dimension into ``out`` (same dtype and trailing dims)."""
    first = tensors[0]
    out.dtype = first.dtype
    dims = [d.size for d in first.tensor_shape.dim]
    dims[0] = sum(t.tensor_shape.dim[0].size for t in tensors)
    for size in dims:
        out.tensor_shape.dim.add(size=size)
    if first.dtype != _STRING and all(t.tensor_content for t in tensors):
        out.tensor_content = b"".join(t.tensor_content for t in tensors)
        return
    joined = np.concatenate([proto_to_numpy(t) for t in tensors])
    if first.dtype == _STRING:
        out.string_val.extend(joined.ravel().tolist())
    else:
        out.tensor_content = np.ascontiguousarray(joined).tobytes()


def split(tensor: Any, rows: list[int]) -> list[Any] | None:
    """Cuts a batch's output back into one tensor per call; None if its first dimension is not
    the batch's row count (the output does not follow the batch dimension)."""
    dims = [d.size for d in tensor.tensor_shape.dim]
    if not dims or dims[0] != sum(rows):
        return None
    array = proto_to_numpy(tensor)
    parts, start = [], 0
    for count in rows:
        part = TensorProto(dtype=tensor.dtype)
        for size in (count, *dims[1:]):
            part.tensor_shape.dim.add(size=size)
        chunk = array[start : start + count]
        if tensor.dtype == _STRING:
            part.string_val.extend(chunk.ravel().tolist())
        else:
            part.tensor_content = np.ascontiguousarray(chunk).tobytes()
        parts.append(part)
        start += count
    return parts


class Batcher:
    """Groups Predict calls of the APIs with a batching policy; ``send`` forwards one call."""

    def __init__(
        self, pool: Any, policies: Mapping[str, Policy], send: Send, max_inflight: int
    ) -> None:
        self.pool = pool
        self.policies = policies  # by API name
        self.send = send
        self.max_inflight = max_inflight
        self.waiting = 0  # calls queued in groups, counted against gateway.max_inflight
        self._groups: dict[tuple[Any, ...], _Group] = {}
        self._unbatchable: set[tuple[Any, ...]] = set()
        self._busy: dict[str, int] = {}  # calls per model inside submit
        self._tasks: set[asyncio.Task[None]] = set()

    def policy(self, model: str) -> Policy | None:
        desired = self.pool.models.get(model)
        return None if desired is None else self.policies.get(desired.api)

    async def submit(
        self,
        policy: Policy,
        data: bytes,
        *,
        model: str,
        version: int | None,
        label: str | None,
        context: grpc.aio.ServicerContext[Any, Any],
        call: Any,
        inflight: int,
    ) -> bytes:
        busy = self._busy.get(model, 0)
        self._busy[model] = busy + 1
        try:
            if not busy and not policy.batch_interval:
                # nothing of this model in flight, so nothing to batch with: no parsing either
                return await self.send(
                    "Predict", data, model=model, version=version, label=label, context=context,
                    call=call,
                )  # fmt: skip
            return await self._submit(
                policy, data, model=model, version=version, label=label, context=context,
                call=call, inflight=inflight,
            )  # fmt: skip
        finally:
            left = self._busy[model] - 1
            if left:
                self._busy[model] = left
            else:
                del self._busy[model]

    async def _submit(
        self,
        policy: Policy,
        data: bytes,
        *,
        model: str,
        version: int | None,
        label: str | None,
        context: grpc.aio.ServicerContext[Any, Any],
        call: Any,
        inflight: int,
    ) -> bytes:
        request = parse(predict_pb2.PredictRequest, data)
        rows = rows_of(request)
        resolved, candidates = self.pool.table.resolve(model, version, label)
        key = _key(model, resolved, request)
        if rows is None or key in self._unbatchable:
            return await self.send(
                "Predict", data, model=model, version=version, label=label, context=context,
                call=call,
            )  # fmt: skip
        if inflight + self.waiting >= self.max_inflight:
            raise ResourceExhausted(
                f"the gateway's in-flight limit ({self.max_inflight}, gateway.max_inflight) is reached"
            )
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(model, resolved, 0, policy)
        group.slots = _PER_BACKEND * max(1, len(candidates))
        if not group.queue and group.inflight < group.slots and not group.policy.batch_interval:
            # a slot is free and nobody waits: this call goes now, on its own
            group.inflight += 1
            try:
                return await self.send(
                    "Predict", data, model=model, version=version, label=label, context=context,
                    call=call,
                )  # fmt: skip
            finally:
                group.inflight -= 1
                self._kick(key, group)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        group.queue.append(_Member(data, request, rows, version, label, context, call, future))
        self.waiting += 1
        self._kick(key, group)
        # A caller that goes away cancels its future; its batch skips or ignores it.
        return await future

    def _kick(self, key: tuple[Any, ...], group: _Group) -> None:
        """Sends what the group may send now: full batches, and (no interval, or the interval
        over) whatever is queued, while fewer than ``slots`` of its batches are in flight."""
        size = group.policy.max_batch_size
        while group.queue and group.inflight < group.slots:
            live = [m for m in group.queue if not m.future.done()]
            self.waiting -= len(group.queue) - len(live)
            group.queue = live
            if not live:
                break
            if len(live) < size and not group.expired and group.policy.batch_interval > 0:
                if group.timer is None:
                    group.timer = asyncio.get_running_loop().call_later(
                        group.policy.batch_interval, self._expire, key, group
                    )
                break
            members, group.queue = live[:size], live[size:]
            self.waiting -= len(members)
            group.expired = False
            group.inflight += 1
            task = asyncio.get_running_loop().create_task(self._run(key, group, members))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if not group.queue:
            if group.timer is not None:
                group.timer.cancel()
                group.timer = None
            if not group.inflight:
                self._groups.pop(key, None)

    def _expire(self, key: tuple[Any, ...], group: _Group) -> None:
        group.timer = None
        group.expired = True
        self._kick(key, group)

    async def _run(self, key: tuple[Any, ...], group: _Group, members: list[_Member]) -> None:
        try:
            if len(members) == 1:
                await self._alone(group.model, members[0])
            else:
                await self._batch(key, group, members)
        except BaseException as exc:
            for member in members:
                _fail(member, exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            group.inflight -= 1
            self._kick(key, group)

    async def _alone(self, model: str, member: _Member) -> None:
        try:
            reply = await self.send(
                "Predict", member.data, model=model, version=member.version,
                label=member.label, context=member.context, call=member.call,
            )  # fmt: skip
        except Exception as exc:
            _fail(member, exc)
        else:
            if not member.future.done():
                member.future.set_result(reply)

    async def _batch(self, key: tuple[Any, ...], group: _Group, members: list[_Member]) -> None:
        request = predict_pb2.PredictRequest()
        first = members[0].request
        request.model_spec.name = group.model
        request.model_spec.version.value = group.version
        request.model_spec.signature_name = first.model_spec.signature_name
        request.output_filter.extend(first.output_filter)
        for name in first.inputs:
            concat([m.request.inputs[name] for m in members], request.inputs[name])
        # the batch lives as long as its most patient caller allows
        lead = max(members, key=_time_left)
        try:
            raw = await self.send(
                "Predict", request.SerializeToString(), model=group.model,
                version=group.version, label=None, context=lead.context, call=lead.call,
            )  # fmt: skip
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            # one call may be at fault: each gets its own answer
            await asyncio.gather(*(self._alone(group.model, m) for m in members))
            return
        reply = predict_pb2.PredictResponse.FromString(raw)
        rows = [m.rows for m in members]
        parts = {name: split(tensor, rows) for name, tensor in reply.outputs.items()}
        if any(p is None for p in parts.values()):
            if key not in self._unbatchable:
                self._unbatchable.add(key)
                log.warning(
                    "batching_off",
                    model=group.model,
                    version=group.version,
                    reason="an output's first dimension is not the batch's row count",
                    rows=sum(rows),
                    outputs={
                        n: [d.size for d in t.tensor_shape.dim] for n, t in reply.outputs.items()
                    },
                )
            await asyncio.gather(*(self._alone(group.model, m) for m in members))
            return
        for i, member in enumerate(members):
            member.call.model = group.model
            member.call.version = group.version
            member.call.backend = lead.call.backend
            member.call.batch = len(members)
            if member.future.done():
                continue
            answer = predict_pb2.PredictResponse()
            answer.model_spec.CopyFrom(reply.model_spec)
            for name, tensors in parts.items():
                assert tensors is not None
                answer.outputs[name].CopyFrom(tensors[i])
            member.future.set_result(answer.SerializeToString())


def _time_left(member: _Member) -> float:
    left = member.context.time_remaining()
    return math.inf if left is None else float(left)


def _fail(member: _Member, exc: BaseException) -> None:
    if member.future.done():
        return
    if isinstance(exc, asyncio.CancelledError):
        member.future.cancel()
    else:
        member.future.set_exception(exc)
