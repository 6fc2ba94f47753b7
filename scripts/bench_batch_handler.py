"""The trivial handler of scripts/bench_batch.py: handle_batch only counts its items (and, with
config["sleep"] seconds, waits that long: a stand-in for work done elsewhere), and notes when
each call started and ended (time.time(), one line per batch in config["log"]), so the time the
job machinery spends between two batches of a worker can be told from the handler's own."""

import os
import time
from typing import Any


class Handler:
    def __init__(self, config: dict[str, Any], job_spec: dict[str, Any] | None = None) -> None:
        self.log = open(config["log"], "a", buffering=1)  # noqa: SIM115 (kept for the job)
        self.items = 0
        self.sleep = float(config.get("sleep", 0))

    def handle_batch(self, payload: list[Any], batch_id: str) -> None:
        started = time.time()
        self.items += len(payload)
        if self.sleep:
            time.sleep(self.sleep)
        self.log.write(f"{os.getpid()} {started:.6f} {time.time():.6f}\n")
