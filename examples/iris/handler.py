# Example API "iris": a TensorFlow handler in the older Cortex style (a TensorFlowPredictor class
# with predict(payload)). The API serves one model, so tensorflow_client.predict needs no model
# name. The payload maps the four measurements to numbers (one flower) or to lists of numbers
# (several flowers); the answer is the label, or one label per flower.
#
#   grpcurl -plaintext -d '{"api":"iris","json":{"sepal_length":5.1,"sepal_width":3.5,
#       "petal_length":1.4,"petal_width":0.2}}' 127.0.0.1:8500 modelmux.v1.Inference/Invoke

DEFAULT_LABELS = ["setosa", "versicolor", "virginica"]


class TensorFlowPredictor:
    def __init__(self, tensorflow_client, config):
        self.client = tensorflow_client
        # handler.config in the API spec may rename the classes
        self.labels = config.get("labels", DEFAULT_LABELS)

    def predict(self, payload):
        # A number sent for one of the model's [-1] inputs becomes a one-element vector.
        prediction = self.client.predict(payload)
        # Outputs come flattened in row-major order: class_ids is [-1, 1], so one id per flower.
        labels = [self.labels[int(i)] for i in prediction["class_ids"]]
        several = any(isinstance(value, list) for value in payload.values())
        return labels if several else labels[0]
