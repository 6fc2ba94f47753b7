"""The gateway's gRPC services: TF Serving's facade and modelmux.v1's Inference and Models."""
