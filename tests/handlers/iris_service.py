# The handler of the IrisClassifier service in iris_service.proto: one method per RPC.
import grpc

labels = ["setosa", "versicolor", "virginica"]
FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")


class Handler:
    def __init__(self, tensorflow_client, config):
        self.client = tensorflow_client

    def _label(self, flower):
        prediction = self.client.predict({f: getattr(flower, f) for f in FEATURES})
        return labels[int(prediction["class_ids"][0])]

    def Classify(self, payload, context):
        return {"label": self._label(payload), "method": "Classify"}

    def ClassifyMany(self, payload):
        for flower in payload.flowers:
            yield {"label": self._label(flower), "method": "ClassifyMany"}

    def ClassifyStream(self, payload, context):
        for flower in payload:
            yield {"label": self._label(flower), "method": "ClassifyStream"}

    def CountFlowers(self, payload):
        return {"label": str(sum(1 for _ in payload)), "method": "CountFlowers"}

    def Reject(self, payload, context):
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no flowers today")
