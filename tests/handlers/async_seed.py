# The seeds' TensorFlow async handler, as its documentation writes it: one model, so predict
# takes the payload alone.
class Handler:
    def __init__(self, config, tensorflow_client, metrics_client):
        self.client = tensorflow_client
        self.metrics_client = metrics_client
        self.labels = config["labels"]

    def handle_async(self, payload, request_id):
        prediction = self.client.predict(payload)
        self.metrics_client.increment("seed_async_done", tags={"api": "iris-async"})
        return {"label": self.labels[int(prediction["class_ids"][0])], "request_id": request_id}
