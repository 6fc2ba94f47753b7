"""The modelmux gateway: routes Predict calls to a pool of TF Serving backends."""
