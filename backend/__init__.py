"""The embedded, TF-Serving-compatible backend behind ``modelmux backend``.

It speaks TensorFlow Serving's own gRPC API (``tensorflow.serving.PredictionService`` and
``ModelService``) and serves real SavedModels with TensorFlow in-process. It is the only modelmux
process that imports the TensorFlow runtime. Entry point: :func:`backend.server.main`.
"""

from __future__ import annotations

import os

# TensorFlow's C++ logging reads this once, when the runtime loads; keep its INFO chatter out of
# the JSON log stream unless the operator asked for it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
