# A python handler (no models) that misbehaves on request.
import os
import signal
import time


class Handler:
    def __init__(self, config):
        self.config = config

    def handle_post(self, payload, query_params, headers):
        mode = query_params.get("mode", "ok")
        if mode == "raise":
            raise ValueError("the payload made the handler fail")
        if mode == "hang":
            time.sleep(float(query_params.get("seconds", "30")))
        if mode == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "echo":
            return {"payload": payload, "tenant": headers.get("x-tenant", "")}
        if mode == "type":
            return type(payload).__name__
        if mode == "bytes":
            return b"\x00\x01raw"
        return {"pid": os.getpid()}
