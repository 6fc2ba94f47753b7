# Example API "python-handler": a Python handler whose models are not TensorFlow models. Each
# model version is a folder holding model.json, a linear model written by scripts/make_models.py:
#
#   {"inputs": ["celsius"], "weights": [1.8], "bias": 32.0, "output": "fahrenheit"}
#
# modelsync mirrors the models from handler.multi_model_reloading; model_client.get_model() calls
# load_model() when a model version is not in memory yet (at most cache_size are kept) and again
# after a version changes on disk.
#
#   grpcurl -plaintext -d '{"api":"python-handler","json":{"celsius":[0,100,-40]},
#       "query_params":{"model":"kelvin"}}' 127.0.0.1:8500 modelmux.v1.Inference/Invoke

import json
import os

import numpy as np


class LinearModel:
    def __init__(self, spec):
        self.inputs = list(spec["inputs"])
        self.weights = np.asarray(spec["weights"], dtype=np.float64)
        self.bias = float(spec["bias"])
        self.output = spec["output"]

    def predict(self, payload, decimals):
        # one column per input; a number or a list of numbers for each
        columns = [np.asarray(payload[name], dtype=np.float64) for name in self.inputs]
        result = self.bias + sum(w * c for w, c in zip(self.weights, columns, strict=True))
        return {self.output: np.round(result, decimals)}


class Handler:
    def __init__(self, config, model_client):
        self.client = model_client
        self.decimals = int(config.get("decimals", 6))

    def load_model(self, model_path):
        # model_path is a version folder (a local copy when disk_cache_size is set); read only
        with open(os.path.join(model_path, "model.json"), encoding="utf-8") as fh:
            return LinearModel(json.load(fh))

    def handle_post(self, payload, query_params):
        model = self.client.get_model(query_params.get("model"), query_params.get("version"))
        return model.predict(payload, self.decimals)
