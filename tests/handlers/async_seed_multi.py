# The seeds' TensorFlow async handler with several models: predict(model_input, model_name,
# model_version), the version given or left to "latest".
class Handler:
    def __init__(self, config, tensorflow_client, metrics_client):
        self.client = tensorflow_client

    def handle_async(self, payload, request_id):
        halves = self.client.predict({"x": payload["x"]}, "half_plus_two", payload.get("version"))
        iris = self.client.predict(payload["flower"], "iris_multi")
        return {"y": halves["y"], "class_id": int(iris["class_ids"][0])}
