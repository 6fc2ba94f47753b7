# Example API "multi-model": one TensorFlow handler in front of two models (half_plus_two and
# iris). The query parameters pick the model and, optionally, the version ("latest" or absent
# means the highest one); the payload is the model's inputs.
#
#   grpcurl -plaintext -d '{"api":"multi-model","json":{"x":[1.0,2.0,5.0]},
#       "query_params":{"model":"half_plus_two","version":"1"}}' \
#       127.0.0.1:8500 modelmux.v1.Inference/Invoke


class Handler:
    def __init__(self, tensorflow_client, config):
        self.client = tensorflow_client

    def handle_post(self, payload, query_params):
        model = query_params.get("model")  # None is refused: this API has two models
        prediction = self.client.predict(payload, model, query_params.get("version"))
        return {
            "model": model,
            "version": prediction.model_version,  # the version that ran
            "outputs": prediction.arrays,  # numpy arrays with their shapes kept
        }
