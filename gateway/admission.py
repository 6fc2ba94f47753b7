"""The gateway-wide in-flight limit (gateway.max_inflight): every call counts from its admission
until its answer, queued for a batch or on the wire; past the limit a call gets
RESOURCE_EXHAUSTED at once (no unbounded queue)."""

from __future__ import annotations

from typing import Any

import grpc

from gateway.edge import Call
from gateway.errors import ResourceExhausted
from gateway.metrics import RequestMetrics
from gateway.request import Resolved, Send


class Admission:
    """The first layer below the API modules; ``send`` hands the call to the next layer."""

    def __init__(
        self, send: Send, *, max_inflight: int, metrics: RequestMetrics | None = None
    ) -> None:
        self.next = send
        self.max_inflight = max_inflight
        self.inflight = 0
        self.metrics = metrics

    async def send(
        self, request: Resolved, context: grpc.aio.ServicerContext[Any, Any], call: Call
    ) -> bytes:
        if self.inflight >= self.max_inflight:
            if self.metrics is not None:
                self.metrics.rejected["gateway.max_inflight"].inc()
            raise ResourceExhausted(
                f"the gateway's in-flight limit ({self.max_inflight}, gateway.max_inflight) is reached"
            )
        self.inflight += 1
        try:
            return await self.next(request, context, call)
        finally:
            self.inflight -= 1
