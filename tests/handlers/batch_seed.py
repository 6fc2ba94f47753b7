# The seeds' TensorFlow batch handler (the first seed: the hook is handle_on_job_complete), as
# its documentation writes it: one model, so predict takes the input alone. Each batch's
# predictions land as an NDJSON file under config["results"]/<job id>/; the hook aggregates them.
# An item is a flower (a dict), or the path or s3:// URI of a JSON file holding one.
import json
import os

import boto3


class Handler:
    def __init__(self, tensorflow_client, config, job_spec):
        self.client = tensorflow_client
        self.labels = config["labels"]
        self.endpoint = config.get("s3_endpoint")
        self.results = os.path.join(config["results"], job_spec["job_id"])
        os.makedirs(self.results, exist_ok=True)

    def _flower(self, item):
        if isinstance(item, dict):
            return item
        if item.startswith("s3://"):
            bucket, _, key = item[len("s3://") :].partition("/")
            s3 = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")
            return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        with open(item) as fh:
            return json.load(fh)

    def handle_batch(self, payload, batch_id):
        lines = []
        for item in payload:
            prediction = self.client.predict(self._flower(item))
            label = self.labels[int(prediction["class_ids"][0])]
            lines.append(json.dumps({"item": item, "label": label}))
        with open(os.path.join(self.results, f"{batch_id}.ndjson"), "w") as fh:
            fh.write("\n".join(lines) + "\n")

    def handle_on_job_complete(self):
        items = 0
        labels = {}
        for name in sorted(os.listdir(self.results)):
            if name.endswith(".ndjson"):
                with open(os.path.join(self.results, name)) as fh:
                    for line in fh:
                        label = json.loads(line)["label"]
                        labels[label] = labels.get(label, 0) + 1
                        items += 1
        with open(os.path.join(self.results, "hook.log"), "a") as fh:
            fh.write(f"{os.getpid()}\n")
        with open(os.path.join(self.results, "summary.json"), "w") as fh:
            json.dump({"items": items, "labels": labels}, fh)
