"""TensorFlow's and TF Serving's own message classes (the installed tensorflow and
tensorflow-serving-api packages), loaded without the TensorFlow runtime.

The embedded backend uses these, since what TensorFlow hands it (``tf.make_tensor_proto``, a
SavedModel's signatures) are instances of them; so do the tests, as the official client side.
The gateway does not: it uses modelmux's own definitions (``modelmux_common.tfserving``), which
need no TensorFlow installed.

TF Serving's generated modules import ``tensorflow.core.framework.*_pb2``. Those are plain
generated files inside the installed ``tensorflow`` folder, and every package between them and the
top has an empty ``__init__``; only ``tensorflow/__init__.py`` itself loads the runtime (~5 s,
~500 MB). So for the duration of the imports below, ``tensorflow`` is registered as an empty
package module pointing at the installed folder; it is removed afterwards, which lets a later real
``import tensorflow`` in the same process work and reuse the very same message classes.
"""

from __future__ import annotations

import importlib.util
import sys
import types

if "tensorflow" not in sys.modules:
    _spec = importlib.util.find_spec("tensorflow")
    if _spec is None or not _spec.submodule_search_locations:
        raise ImportError(
            "TensorFlow is not installed: the embedded backend needs the backend extra "
            "(pip install 'modelmux[backend]')"
        )
    _light: types.ModuleType | None = types.ModuleType("tensorflow")
    _light.__path__ = list(_spec.submodule_search_locations)  # type: ignore[union-attr]
    sys.modules["tensorflow"] = _light  # type: ignore[assignment]
else:
    _light = None

try:
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
    from tensorflow.core.protobuf import meta_graph_pb2
    from tensorflow_serving.apis import (
        classification_pb2,
        get_model_metadata_pb2,
        get_model_status_pb2,
        inference_pb2,
        input_pb2,
        model_management_pb2,
        model_pb2,
        model_service_pb2,
        model_service_pb2_grpc,
        predict_pb2,
        prediction_service_pb2,
        prediction_service_pb2_grpc,
        regression_pb2,
    )
    from tensorflow_serving.config import model_server_config_pb2
finally:
    if _light is not None and sys.modules.get("tensorflow") is _light:
        del sys.modules["tensorflow"]

__all__ = [
    "classification_pb2",
    "get_model_metadata_pb2",
    "get_model_status_pb2",
    "inference_pb2",
    "input_pb2",
    "meta_graph_pb2",
    "model_management_pb2",
    "model_pb2",
    "model_server_config_pb2",
    "model_service_pb2",
    "model_service_pb2_grpc",
    "predict_pb2",
    "prediction_service_pb2",
    "prediction_service_pb2_grpc",
    "regression_pb2",
    "tensor_pb2",
    "tensor_shape_pb2",
    "types_pb2",
]
