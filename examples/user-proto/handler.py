# Example API "user-proto": the handler of the HalfPlusTwo service in half_plus_two.proto. Each
# RPC is answered by the method named after it, called with the request message (and the gRPC
# context when the method has a parameter named context). A unary method returns the response
# message or a dict of its fields; a server-streaming method yields them.
#
#   grpcurl -plaintext 127.0.0.1:8500 describe example.halfplustwo.v1.HalfPlusTwo
#   grpcurl -plaintext -d '{"x":[1.0,2.0,5.0]}' \
#       127.0.0.1:8500 example.halfplustwo.v1.HalfPlusTwo/Compute


class Handler:
    def __init__(self, tensorflow_client, metrics_client):
        self.client = tensorflow_client
        self.metrics = metrics_client

    def _run(self, x, version):
        # version 0 (the proto3 default) means the latest
        return self.client.predict({"x": x}, model_version=version or None)

    def Compute(self, payload, context):
        prediction = self._run(list(payload.x), payload.version)
        self.metrics.increment("half_plus_two_values", len(payload.x), tags={"rpc": "Compute"})
        return {"y": prediction["y"], "version": prediction.model_version}

    def ComputeStream(self, payload, context):
        for x in payload.x:
            if not context.is_active():  # the caller went away
                return
            # a single number for the model's [-1] input becomes a one-element vector
            prediction = self._run(x, payload.version)
            yield {"x": x, "y": prediction["y"][0], "version": prediction.model_version}
        self.metrics.increment(
            "half_plus_two_values", len(payload.x), tags={"rpc": "ComputeStream"}
        )
