"""Server-side batching: concurrent Predict calls for one model version go to a backend as one call.

An API opts in with ``handler.server_side_batching`` (``max_batch_size``, ``batch_interval``).
Calls are grouped by what the backend must see identically: model, resolved version, signature,
output filter, and each input's name, dtype and shape past the first dimension. A group's calls
are concatenated along the first dimension (the batch dimension) and the backend's outputs split
back by the rows each call sent.

A call for a model with nothing else in flight is forwarded as it came, not even parsed. Otherwise
its group sends a batch at once while it has fewer batches in flight than twice the backends
holding its version, so no call waits for company: batches form only while the backends are busy,
from the calls that queued meanwhile (at most ``max_batch_size`` calls and
``gateway.max_message_bytes`` of requests per batch). With ``batch_interval`` a batch that is not
full waits until its oldest call has waited that long.

A call goes alone when it cannot be batched safely: fields besides model spec, inputs and output
filter, a scalar input, inputs that disagree on their first dimension, or a tensor whose values do
not match its shape. A batch the backend refuses (INVALID_ARGUMENT, RESOURCE_EXHAUSTED) is retried
call by call, so one bad request fails alone. Batching is turned off for a (model, version,
signature, output filter) whose outputs do not follow the batch dimension, or whose batches the
backend refuses while their calls pass alone (logged once as ``batching_off``).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import structlog

from gateway.edge import Call
from gateway.errors import parse
from gateway.metrics import BATCH_CALLS, BATCH_ROWS
from gateway.request import Resolved, Send
from gateway.routing import Tables
from gateway.tensors import NUMPY_OF_TF, VAL_FIELD, proto_to_numpy
from modelmux_common.tfserving import predict_pb2, tensor_pb2

log = structlog.get_logger("modelmux.gateway")

TensorProto = tensor_pb2.TensorProto
_STRING = 7  # DT_STRING
# batches in flight per group and backend: one running, one on the wire
_PER_BACKEND = 2


@dataclass(frozen=True, slots=True)
class Policy:
    max_batch_size: int
    batch_interval: float = 0.0


@dataclass(slots=True)
class _Member:
    resolved: Resolved
    request: Any  # predict_pb2.PredictRequest
    rows: int
    context: grpc.aio.ServicerContext[Any, Any]
    call: Call
    future: asyncio.Future[bytes]
    arrived: float


@dataclass(slots=True)
class _Group:
    model: str
    version: int
    slots: int
    policy: Policy
    queue: list[_Member] = field(default_factory=list)
    inflight: int = 0
    timer: asyncio.TimerHandle | None = None


_PLAIN_FIELDS = frozenset({"model_spec", "inputs", "output_filter"})


def rows_of(request: Any) -> int | None:
    """The rows a request sends (every input's first dimension), or None when it cannot be
    batched safely: other fields than model spec, inputs and output filter; no inputs; a scalar;
    inputs that disagree on their first dimension; values that do not match a tensor's shape."""
    if any(f.name not in _PLAIN_FIELDS for f, _ in request.ListFields()):
        return None
    rows = None
    for tensor in request.inputs.values():
        dims = [d.size for d in tensor.tensor_shape.dim]
        if not dims or dims[0] < 1 or min(dims) < 0 or (rows is not None and dims[0] != rows):
            return None
        if _count(tensor) != math.prod(dims):
            return None
        rows = dims[0]
    return rows


def _count(tensor: Any) -> int:
    """How many values a tensor holds (-1: a dtype batching does not handle)."""
    if tensor.dtype == _STRING:
        return len(tensor.string_val)
    dtype = NUMPY_OF_TF.get(tensor.dtype)
    if dtype is None:
        return -1
    if tensor.tensor_content:
        size, extra = divmod(len(tensor.tensor_content), dtype.itemsize)
        return -1 if extra else size
    return len(getattr(tensor, VAL_FIELD[tensor.dtype]))


def _key(model: str, version: int, request: Any) -> tuple[Any, ...]:
    inputs = tuple(
        sorted(
            (name, t.dtype, tuple(d.size for d in t.tensor_shape.dim[1:]))
            for name, t in request.inputs.items()
        )
    )
    return (*_model_key(model, version, request), inputs)


def _model_key(model: str, version: int, request: Any) -> tuple[Any, ...]:
    """What batching is turned off for: the outputs depend on these, not on the input shapes."""
    return model, version, request.model_spec.signature_name, tuple(request.output_filter)


def concat(tensors: list[Any], out: Any) -> None:
    """Joins tensors along their first dimension into ``out`` (same dtype and trailing dims;
    their values checked against their shapes by ``rows_of``)."""
    first = tensors[0]
    out.dtype = first.dtype
    dims = [d.size for d in first.tensor_shape.dim]
    dims[0] = sum(t.tensor_shape.dim[0].size for t in tensors)
    for size in dims:
        out.tensor_shape.dim.add(size=size)
    if first.dtype == _STRING:
        for t in tensors:
            out.string_val.extend(t.string_val)
    elif all(t.tensor_content for t in tensors):
        out.tensor_content = b"".join(t.tensor_content for t in tensors)
    else:
        joined = np.concatenate([proto_to_numpy(t) for t in tensors])
        out.tensor_content = np.ascontiguousarray(joined).tobytes()


def split(tensor: Any, rows: list[int]) -> list[Any] | None:
    """Cuts a batch's output back into one tensor per call; None if that cannot be done: its
    first dimension is not the batch's row count (the output does not follow the batch
    dimension), or its values are not one per element."""
    dims = [d.size for d in tensor.tensor_shape.dim]
    total = sum(rows)
    if not dims or dims[0] != total:
        return None
    per_row = math.prod(dims[1:])
    if tensor.dtype == _STRING:
        values: Any = tensor.string_val
        if len(values) != total * per_row:
            return None
    elif tensor.tensor_content:
        values = tensor.tensor_content  # any dtype: cut by bytes
        if len(values) % total:
            return None
        per_row = len(values) // total
    elif tensor.dtype in NUMPY_OF_TF and _count(tensor) == total * per_row:
        values = proto_to_numpy(tensor).reshape(-1)
    else:
        return None
    parts, start = [], 0
    for count in rows:
        part = TensorProto(dtype=tensor.dtype)
        for size in (count, *dims[1:]):
            part.tensor_shape.dim.add(size=size)
        chunk = values[start * per_row : (start + count) * per_row]
        if tensor.dtype == _STRING:
            part.string_val.extend(chunk)
        elif isinstance(chunk, np.ndarray):
            part.tensor_content = chunk.tobytes()
        else:
            part.tensor_content = chunk
        parts.append(part)
        start += count
    return parts


class Batching:
    """The layer in front of forwarding that groups the Predict calls of the APIs with a batching
    policy; it keeps its own counts (calls per model, batches per group)."""

    def __init__(
        self, send: Send, policies: Mapping[str, Policy], *, max_bytes: int, tables: Tables
    ) -> None:
        self.next = send
        self.policies = policies  # by API name
        self.max_bytes = max_bytes
        self.tables = tables
        self._groups: dict[tuple[Any, ...], _Group] = {}
        self._off: set[tuple[Any, ...]] = set()  # _model_key()s batching is turned off for
        self._busy: dict[str, int] = {}  # calls per model inside send
        self._tasks: set[asyncio.Task[None]] = set()

    async def send(
        self, resolved: Resolved, context: grpc.aio.ServicerContext[Any, Any], call: Call
    ) -> bytes:
        policy = self.policies.get(resolved.api)
        if policy is None or resolved.method != "Predict" or resolved.partial:
            return await self.next(resolved, context, call)
        model = resolved.model
        busy = self._busy.get(model, 0)
        self._busy[model] = busy + 1
        try:
            if not busy and not policy.batch_interval:
                # nothing of this model in flight, so nothing to batch with: no parsing either
                return await self.next(resolved, context, call)
            request = parse(predict_pb2.PredictRequest, resolved.data)
            rows = rows_of(request)
            version = resolved.version
            if rows is None or _model_key(model, version, request) in self._off:
                return await self.next(resolved, context, call)
            key = _key(model, version, request)
            group = self._groups.get(key)
            if group is None:
                group = self._groups[key] = _Group(model, version, 0, policy)
            group.slots = _PER_BACKEND * max(1, len(resolved.candidates))
            if not group.queue and group.inflight < group.slots and not policy.batch_interval:
                # a slot is free and nobody waits: this call goes now, on its own
                group.inflight += 1
                try:
                    return await self.next(resolved, context, call)
                finally:
                    group.inflight -= 1
                    self._kick(key, group)
            loop = asyncio.get_running_loop()
            future: asyncio.Future[bytes] = loop.create_future()
            group.queue.append(_Member(resolved, request, rows, context, call, future, loop.time()))
            self._kick(key, group)
            # A caller that goes away cancels its future; its batch skips or ignores it.
            return await future
        finally:
            left = self._busy[model] - 1
            if left:
                self._busy[model] = left
            else:
                del self._busy[model]

    def _fresh(self, resolved: Resolved) -> Resolved:
        """The call waited in a queue (the table may have changed meanwhile): where its version is AVAILABLE now (as it was resolved
        when the version has left the table, for forwarding to fail as it should)."""
        route = self.tables.table.routes.get(resolved.model)
        targets = route.versions.get(resolved.version) if route is not None else None
        if not targets or targets is resolved.candidates:
            return resolved
        return resolved._replace(candidates=targets)

    def _kick(self, key: tuple[Any, ...], group: _Group) -> None:
        """Sends what the group may send now, while fewer than ``slots`` of its batches are in
        flight: full batches, and (no interval, or its oldest call waited it out) what is
        queued."""
        policy = group.policy
        while group.queue and group.inflight < group.slots:
            group.queue = [m for m in group.queue if not m.future.done()]
            if not group.queue:
                break
            members: list[_Member] = []
            size = 0
            for member in group.queue[: policy.max_batch_size]:
                if members and size + len(member.resolved.data) > self.max_bytes:
                    break
                members.append(member)
                size += len(member.resolved.data)
            full = len(members) < len(group.queue) or len(members) == policy.max_batch_size
            due = group.queue[0].arrived + policy.batch_interval
            if not full and policy.batch_interval and asyncio.get_running_loop().time() < due:
                if group.timer is None:
                    group.timer = asyncio.get_running_loop().call_at(due, self._expire, key, group)
                break
            del group.queue[: len(members)]
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
        self._kick(key, group)

    async def _run(self, key: tuple[Any, ...], group: _Group, members: list[_Member]) -> None:
        try:
            if len(members) == 1:
                await self._alone(group.model, members[0])
            else:
                await self._batch(group, members)
        except BaseException as exc:
            for member in members:
                _fail(member, exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            group.inflight -= 1
            self._kick(key, group)

    async def _alone(self, model: str, member: _Member) -> bool:
        """Sends one call of a group on its own; True when it succeeded."""
        if member.future.done():
            return True
        try:
            reply = await self.next(self._fresh(member.resolved), member.context, member.call)
        except Exception as exc:
            _fail(member, exc)
            return False
        if not member.future.done():
            member.future.set_result(reply)
        return True

    async def _one_by_one(self, group: _Group, members: list[_Member]) -> bool:
        results = await asyncio.gather(*(self._alone(group.model, m) for m in members))
        return all(results)

    def _turn_off(self, group: _Group, request: Any, reason: str, **details: Any) -> None:
        key = _model_key(group.model, group.version, request)
        if key in self._off:
            return
        if len(self._off) >= 4096:  # versions come and go: forget the oldest decisions
            self._off.clear()
        self._off.add(key)
        log.warning(
            "batching_off", model=group.model, version=group.version, reason=reason, **details
        )

    async def _batch(self, group: _Group, members: list[_Member]) -> None:
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
        batch = self._fresh(lead.resolved)._replace(
            data=request.SerializeToString(),
            asked=group.version,
            latest=False,
        )
        try:
            raw = await self.next(batch, lead.context, lead.call)
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in _REFUSED:
                raise
            # one call may be at fault, or the batch too large: each gets its own answer
            if await self._one_by_one(group, members) and exc.code() in _INVALID:
                self._turn_off(
                    group, first, "the backend refuses batches whose calls it takes one by one",
                    error=exc.details(),
                )  # fmt: skip
            return
        reply = predict_pb2.PredictResponse.FromString(raw)
        rows = [m.rows for m in members]
        parts = {name: split(tensor, rows) for name, tensor in reply.outputs.items()}
        if any(p is None for p in parts.values()):
            self._turn_off(
                group, first, "an output does not follow the batch dimension", rows=sum(rows),
                outputs={n: [d.size for d in t.tensor_shape.dim] for n, t in reply.outputs.items()},
            )  # fmt: skip
            await self._one_by_one(group, members)
            return
        BATCH_CALLS.labels(group.model).observe(len(members))
        BATCH_ROWS.labels(group.model).observe(sum(rows))
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


_INVALID = (grpc.StatusCode.INVALID_ARGUMENT,)
_REFUSED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)


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
