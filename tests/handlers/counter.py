# A python handler with live-reloaded models. Each model version is a folder holding value.txt;
# load_model records how many loaded models are alive and how many versions sit in the disk cache
# at the moment of every load, so a test can check the cache limits.
import gc
import os
import threading

_lock = threading.Lock()
stats = {"alive": 0, "max_alive": 0, "max_on_disk": 0, "loads": 0, "paths": []}


class Model:
    def __init__(self, value):
        self.value = value
        with _lock:
            stats["alive"] += 1
            stats["max_alive"] = max(stats["max_alive"], stats["alive"])

    def __del__(self):
        with _lock:
            stats["alive"] -= 1


class Handler:
    def __init__(self, config, model_client):
        self.client = model_client
        self.offset = config.get("offset", 0)

    def load_model(self, model_path):
        on_disk = [n for n in os.listdir(os.path.dirname(model_path)) if not n.endswith(".partial")]
        with _lock:
            stats["loads"] += 1
            stats["max_on_disk"] = max(stats["max_on_disk"], len(on_disk))
            stats["paths"].append(model_path)
        with open(os.path.join(model_path, "value.txt")) as fh:
            return Model(int(fh.read()) + self.offset)

    def handle_post(self, payload, query_params):
        if query_params.get("stats"):
            gc.collect()
            return stats
        model = self.client.get_model(query_params["model"], query_params.get("version"))
        return {"value": model.value}
