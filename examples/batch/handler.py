# Example API "iris-batch": a BatchAPI with a TensorFlow handler written exactly as the first
# seed's batch interface shows (Handler(tensorflow_client, config, job_spec), handle_batch(payload,
# batch_id), handle_on_job_complete()). Each item is a flower (the four measurements); a batch is
# classified in one predict call and its predictions are written as NDJSON, one line per flower,
# to <results>/<job id>/<batch id>.ndjson. Once every batch has ended, the completion hook reads
# them back and writes <results>/<job id>/summary.json (flowers per label). docs/batch.md:
#
#   modelmux job submit --api iris-batch --workers 2 --ndjson examples/batch/flowers.ndjson \
#       --batch-size 4 --watch
#   grpcurl -plaintext -d '{"api":"iris-batch","workers":1,"item_list":{"batch_size":2,
#       "items":[{"sepal_length":5.1,"sepal_width":3.5,"petal_length":1.4,"petal_width":0.2}]}}' \
#       127.0.0.1:8500 modelmux.v1.Jobs/SubmitJob
import json
import os

DEFAULT_LABELS = ["setosa", "versicolor", "virginica"]
MEASUREMENTS = ("sepal_length", "sepal_width", "petal_length", "petal_width")


class Handler:
    def __init__(self, tensorflow_client, config, job_spec):
        self.client = tensorflow_client
        self.labels = config.get("labels", DEFAULT_LABELS)
        # config["results"]: a folder; a relative one is taken from this file's folder. A job's
        # config may name another (the job's values win over handler.config's).
        results = os.path.join(os.path.dirname(os.path.abspath(__file__)), config["results"])
        self.folder = os.path.join(results, job_spec["job_id"])
        self.job_id = job_spec["job_id"]
        os.makedirs(self.folder, exist_ok=True)

    def handle_batch(self, payload, batch_id):
        # the model's four inputs are [-1] vectors: one column per measurement, a row per flower
        columns = {name: [float(flower[name]) for flower in payload] for name in MEASUREMENTS}
        prediction = self.client.predict(columns)
        labels = [self.labels[int(i)] for i in prediction["class_ids"]]
        lines = [
            json.dumps({"flower": f, "label": label})
            for f, label in zip(payload, labels, strict=True)
        ]
        # A batch runs at least once: a second run (its worker died after writing) rewrites the
        # same file, whole (written aside, then renamed), so the hook never reads half a file.
        path = os.path.join(self.folder, f"{batch_id}.ndjson")
        with open(path + ".partial", "w") as fh:
            fh.write("\n".join(lines) + "\n")
        os.replace(path + ".partial", path)

    def handle_on_job_complete(self):
        counts = {}
        for name in sorted(os.listdir(self.folder)):
            if name.endswith(".ndjson"):
                with open(os.path.join(self.folder, name)) as fh:
                    for line in fh:
                        label = json.loads(line)["label"]
                        counts[label] = counts.get(label, 0) + 1
        summary = {"job_id": self.job_id, "flowers": sum(counts.values()), "labels": counts}
        with open(os.path.join(self.folder, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2)
