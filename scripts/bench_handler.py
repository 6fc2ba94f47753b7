"""The TensorFlow handler of the benchmark's ``invoke`` target (scripts/bench.py).

A realtime handler as a Cortex user would write it: take the JSON payload, run the API's model
with ``tensorflow_client.predict``, return a small dict. The API serves one model
(``half_plus_two``), so ``predict`` needs no model name, and ``model_version`` is left to the
gateway's latest. It is the least a TensorFlow handler can do, so what the ``invoke`` row adds to
``own-json`` (the same JSON in and out, without a handler) is the cost of the handler machinery:
the hop to the worker process and the worker's ``Predict`` call back into the gateway.

    payload  {"x": [1.0, 2.0, 5.0]}
    returns  {"y": [3.5, 4.0, 5.5], "version": 2}
"""

from typing import Any


class Handler:
    def __init__(self, tensorflow_client: Any, config: dict[str, Any]) -> None:
        self.client = tensorflow_client
        self.config = config

    def handle_post(self, payload: Any) -> dict[str, Any]:
        prediction = self.client.predict(payload)
        return {"y": prediction["y"], "version": prediction.model_version}
