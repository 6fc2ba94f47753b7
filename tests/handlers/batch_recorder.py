# A batch python handler in the second seed's form (the hook is on_job_complete) that records what
# it is given and every run in config["log"] (JSON lines), so tests can tell which batch ran where
# and how often. Items that are dicts may ask for a failure ({"fail": ...}) or a delay ({"delay":
# s}); config["delay"] delays every batch, config["hook_delay"] the completion hook.
import json
import os
import time


class Handler:
    def __init__(self, config, job_spec):
        self.log = config["log"]
        self.delay = float(config.get("delay", 0))
        if config.get("fail_init"):
            raise RuntimeError("asked to fail in __init__")
        self.fail_hook = config.get("fail_hook", False)
        self.hook_delay = float(config.get("hook_delay", 0))
        self._note("init", config=config, job_spec=job_spec)

    def _note(self, what, **fields):
        with open(self.log, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"what": what, "pid": os.getpid(), **fields}) + "\n")

    def handle_batch(self, payload, batch_id):
        self._note("start", batch_id=batch_id)
        delay = self.delay
        for item in payload:
            if isinstance(item, dict):
                if item.get("fail"):
                    raise ValueError(f"asked to fail: {item['fail']}")
                delay = max(delay, float(item.get("delay", 0)))
        time.sleep(delay)
        self._note("done", batch_id=batch_id, items=payload)

    def on_job_complete(self):
        self._note("hook")
        time.sleep(self.hook_delay)
        if self.fail_hook:
            raise RuntimeError("the hook was asked to fail")
