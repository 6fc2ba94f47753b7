"""TF Serving's message classes for the gateway, from modelmux's own definitions: no TensorFlow
needed, installed or imported.

Each name is a namespace shaped like protoc's generated module of that TF Serving file (same
classes, nested types, enum values), built from ``protos/tfserving/`` in a private descriptor pool
(``modelmux_common.tfserving_protos``), so TensorFlow's own modules can be imported beside them.
Their bytes are TF Serving's, field for field. The embedded backend, which gets TensorFlow's
classes from TensorFlow itself, uses ``backend.tfserving`` instead.
"""

from __future__ import annotations

from typing import Any

from modelmux_common.tfserving_protos import module

_APIS = "tensorflow_serving/apis/"
classification_pb2: Any = module(_APIS + "classification.proto")
get_model_metadata_pb2: Any = module(_APIS + "get_model_metadata.proto")
get_model_status_pb2: Any = module(_APIS + "get_model_status.proto")
inference_pb2: Any = module(_APIS + "inference.proto")
input_pb2: Any = module(_APIS + "input.proto")
model_management_pb2: Any = module(_APIS + "model_management.proto")
model_pb2: Any = module(_APIS + "model.proto")
model_service_pb2: Any = module(_APIS + "model_service.proto")
predict_pb2: Any = module(_APIS + "predict.proto")
prediction_service_pb2: Any = module(_APIS + "prediction_service.proto")
regression_pb2: Any = module(_APIS + "regression.proto")
model_server_config_pb2: Any = module("tensorflow_serving/config/model_server_config.proto")
tensor_pb2: Any = module("tensorflow/core/framework/tensor.proto")
tensor_shape_pb2: Any = module("tensorflow/core/framework/tensor_shape.proto")
types_pb2: Any = module("tensorflow/core/framework/types.proto")
meta_graph_pb2: Any = module("tensorflow/core/protobuf/meta_graph.proto")

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
    "predict_pb2",
    "prediction_service_pb2",
    "regression_pb2",
    "tensor_pb2",
    "tensor_shape_pb2",
    "types_pb2",
]
