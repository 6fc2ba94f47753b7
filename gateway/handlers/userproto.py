"""User-defined services: an API's ``protobuf_path`` compiled at start into descriptors.

The gateway and its handler workers share one compiled FileDescriptorSet: the gateway serves the
services (forwarding bytes) and lists them in reflection; the workers build the message classes
that the handler's methods receive and return.
"""

from __future__ import annotations

import importlib.resources
import os
import subprocess
import sys
import tempfile

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor, MethodDescriptor, ServiceDescriptor


class ProtoError(ValueError):
    """A .proto that does not compile or clashes with what the process already knows."""


def compile_proto(path: str) -> bytes:
    """``path`` and its imports as a serialized FileDescriptorSet; imports resolve next to it and
    among protobuf's well-known types."""
    include = str(importlib.resources.files("grpc_tools") / "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "set.pb")
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{os.path.dirname(path)}",
                f"-I{include}",
                "--include_imports",
                f"--descriptor_set_out={out}",
                os.path.basename(path),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise ProtoError((done.stderr or done.stdout).strip() or "protoc failed")
        with open(out, "rb") as fh:
            return fh.read()


def load(data: bytes, path: str) -> FileDescriptor:
    """Adds a compiled set to the default pool (which reflection reads); returns ``path``'s file."""
    pool = descriptor_pool.Default()
    files = descriptor_pb2.FileDescriptorSet.FromString(data).file
    for proto in files:
        try:
            known = pool.FindFileByName(proto.name)
        except KeyError:
            try:
                pool.AddSerializedFile(proto.SerializeToString())
            except (TypeError, ValueError) as exc:
                raise ProtoError(f"{proto.name}: {exc}") from None
            continue
        if _outline(known) != (
            proto.package,
            sorted(m.name for m in proto.message_type),
            sorted(s.name for s in proto.service),
        ):
            raise ProtoError(f"{proto.name} clashes with a different file of the same name")
    return pool.FindFileByName(os.path.basename(path))


def _outline(file: FileDescriptor) -> tuple[str, list[str], list[str]]:
    return file.package, sorted(file.message_types_by_name), sorted(file.services_by_name)


def services(file: FileDescriptor) -> list[ServiceDescriptor]:
    return list(file.services_by_name.values())


def shape(method: MethodDescriptor) -> str:
    """unary_unary, unary_stream, stream_unary or stream_stream."""
    client = "stream" if method.client_streaming else "unary"
    server = "stream" if method.server_streaming else "unary"
    return f"{client}_{server}"
