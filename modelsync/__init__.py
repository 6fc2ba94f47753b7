"""modelsync: mirrors S3 prefixes and local folders of models (TF SavedModels, or any
files for python handlers) onto a shared volume.

Every published content is immutable (``<target>/.store/<model>/r<revision>/<version>``); the view
TF Serving reads (``<target>/<model>/<version>``) is a symlink swapped atomically; each change is an
event with a global revision, streamed over gRPC (``modelmux.modelsync.v1.ModelSync``).
See docs/modelsync.md. This package never imports TensorFlow.
"""
