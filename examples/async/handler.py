# Example API "iris-async": an AsyncAPI with a TensorFlow handler written exactly as the seeds'
# async interface shows (Handler(config, tensorflow_client, metrics_client), handle_async(payload,
# request_id)). It classifies the flower `rounds` times (default 50, about a second here) to stand
# for slow inference, and answers with the label and how long it took. Submit, then Get or Watch:
#
#   grpcurl -plaintext -d '{"api":"iris-async","json":{"sepal_length":5.1,"sepal_width":3.5,
#       "petal_length":1.4,"petal_width":0.2}}' 127.0.0.1:8500 modelmux.v1.Async/Submit
#   grpcurl -plaintext -d '{"id":"<id>"}' 127.0.0.1:8500 modelmux.v1.Async/Watch
import time

LABELS = ["setosa", "versicolor", "virginica"]


class Handler:
    def __init__(self, config, tensorflow_client, metrics_client):
        self.client = tensorflow_client
        self.metrics = metrics_client
        self.rounds = int(config.get("rounds", 50))

    def handle_async(self, payload, request_id):
        started = time.monotonic()
        for _ in range(self.rounds):
            prediction = self.client.predict(payload)
        label = LABELS[int(prediction["class_ids"][0])]
        seconds = time.monotonic() - started
        self.metrics.histogram("iris_async_seconds", seconds, tags={"label": label})
        return {"request_id": request_id, "label": label, "seconds": round(seconds, 3)}
