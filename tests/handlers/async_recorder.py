# An async python handler that records each run ("start"/"done", the request id, its gateway's
# pid and its own) in config["log"], so tests can tell which request ran where and how often.
# A dict payload may ask for a delay or a failure; str and bytes payloads come back as they are.
import os
import time


class Handler:
    def __init__(self, config):
        self.log = config["log"]
        self.delay = float(config.get("delay", 0))

    def _note(self, what, request_id):
        with open(self.log, "a", encoding="utf-8") as fh:
            fh.write(f"{what} {request_id} {os.getppid()} {os.getpid()}\n")

    def handle_async(self, payload, request_id):
        self._note("start", request_id)
        delay = self.delay
        if isinstance(payload, dict):
            if payload.get("fail"):
                raise ValueError(f"asked to fail: {payload['fail']}")
            delay = float(payload.get("delay", delay))
        time.sleep(delay)
        self._note("done", request_id)
        if isinstance(payload, bytes):
            return payload[::-1]
        return {"id": request_id, "payload": payload, "type": type(payload).__name__}
