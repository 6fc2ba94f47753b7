"""The embedded, TF-Serving-compatible backend behind ``modelmux backend``.

It speaks TensorFlow Serving's own gRPC API (``tensorflow.serving.PredictionService`` and
``ModelService``) and serves real SavedModels with TensorFlow in-process. It is the only modelmux
process that imports the TensorFlow runtime. Entry point: :func:`backend.server.main`, through
``modelmux backend``, which quiets TensorFlow's C++ logging before the runtime loads
(modelmux_common/cli.py).
"""
