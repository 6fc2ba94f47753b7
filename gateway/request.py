"""A request resolved by routing: the one value that travels down admission, batching and
forwarding (in place of long parameter lists), built once per call."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple

import grpc

from gateway.edge import Call
from gateway.routing import Table, Target


class Resolved(NamedTuple):
    """What to send and where it may go. Immutable (a named tuple: built once per call, it
    costs a third of a frozen dataclass; ``_replace`` makes a changed copy)."""

    method: str  # the TF Serving method forwarded
    data: bytes  # the serialized TF Serving request, as the client sent it
    model: str  # the model the client named
    api: str  # the API the model belongs to
    version: int  # the version routing chose
    candidates: Sequence[Target]  # where that version is AVAILABLE
    # The version the request itself carries (None: none, or a label). Forwarding pins the call
    # to ``version`` when they differ, unless ``latest`` and the target's own latest is it.
    asked: int | None
    latest: bool  # the request asks for latest (no version, no label)
    # the model spec was read from the request's first fields only: batching (which parses the
    # whole request) leaves it alone, and the backend always gets the resolved spec
    partial: bool = False


# One layer of the path below the API modules (admission, batching, forwarding): each takes the
# resolved request, the caller's context (for its deadline) and its summary record.
Send = Callable[[Resolved, grpc.aio.ServicerContext[Any, Any], Call], Awaitable[bytes]]


def resolve(
    table: Table,
    method: str,
    data: bytes,
    *,
    model: str,
    version: int | None,
    label: str | None,
    partial: bool = False,
) -> Resolved:
    """Routes a request for ``model`` asking for ``version`` / ``label`` / latest (both None).
    ``partial``: the model spec was read from the request's first fields only (see
    gateway.api.facade.model_spec_of), so the backend always gets the resolved one."""
    resolved, candidates = table.resolve(model, version, label)
    latest = version is None and label is None and not partial
    return Resolved(
        method=method,
        data=data,
        model=model,
        api=table.routes[model].api,
        version=resolved,
        candidates=candidates,
        asked=None if partial else version,
        latest=latest,
        partial=partial,
    )
