"""The trivial handler of scripts/bench_async.py: the same class serves the realtime API
(``handle_post``) and the async ones (``handle_async``, which also says when it started, so the
queue's share of the latency can be told apart)."""

import time
from typing import Any


class Handler:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def handle_post(self, payload: Any) -> Any:
        return payload

    def handle_async(self, payload: Any, request_id: str) -> dict[str, Any]:
        return {"started": time.time(), "payload": payload}
