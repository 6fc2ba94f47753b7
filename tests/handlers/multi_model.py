# A multi-model TensorFlow handler in the realtime API's style: the model (and version) come from
# the query parameters.
class Handler:
    def __init__(self, tensorflow_client, config):
        self.client = tensorflow_client

    def handle_post(self, payload, query_params):
        return self.client.predict(payload, query_params["model"], query_params["version"])
