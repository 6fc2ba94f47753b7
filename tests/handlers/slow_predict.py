# A TensorFlow handler that takes its time before it predicts (for the drain test); the metric
# line tells the test that the call is in progress.
import time


class Handler:
    def __init__(self, tensorflow_client, config, metrics_client):
        self.client = tensorflow_client
        self.metrics = metrics_client
        self.delay = config["delay"]

    def handle_post(self, payload):
        self.metrics.increment("slow_started")
        time.sleep(self.delay)
        return self.client.predict(payload)["class_ids"]
