"""TF Serving's messages from modelmux's own definitions, without TensorFlow.

``protos/tfserving/`` defines, wire-compatibly and under TF Serving's own file, package, message
and field names, every message and service the gateway serves or sends on the TF Serving facade
(``scripts/gen_tfserving.py`` compiles them into ``descriptors.binpb`` beside this file). They are
loaded into a private :class:`DescriptorPool`, never into protobuf's default pool, where
TensorFlow's own generated modules register the same names: a process may hold both (the tests,
a handler worker running TensorFlow code), and the two never clash.

:func:`module` gives, for one file, what protoc's generated Python module of it would hold: the
message classes, enum wrappers, top-level enum values and ``DESCRIPTOR``. Its classes are not
TensorFlow's: a message of one kind cannot be ``CopyFrom``-ed into the other, but the bytes are
the same, so serialize and parse across. :func:`reflection_pool` is what server reflection reads.
"""

from __future__ import annotations

import functools
import importlib.resources
import types
from collections.abc import Iterator
from typing import Any

from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, wrappers_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor, FileDescriptor
from google.protobuf.internal import builder

DescriptorPool = descriptor_pool.DescriptorPool

DESCRIPTOR_SET = "descriptors.binpb"
# The well-known types these files import, taken from the installed protobuf: byte for byte the
# files the default pool holds.
_WELL_KNOWN = (any_pb2, wrappers_pb2)


def descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    """The committed set: modelmux's own TF Serving files, imports first."""
    data = importlib.resources.files(__package__).joinpath(DESCRIPTOR_SET).read_bytes()
    return descriptor_pb2.FileDescriptorSet.FromString(data)


@functools.cache
def pool() -> DescriptorPool:
    """The private pool: protobuf's well-known types that the files import, then the files."""
    private = DescriptorPool()
    for well_known in _WELL_KNOWN:
        private.AddSerializedFile(well_known.DESCRIPTOR.serialized_pb)
    for file in descriptor_set().file:
        private.AddSerializedFile(file.SerializeToString())
    return private


def file_names() -> list[str]:
    """The canonical names of the files defined here (``tensorflow_serving/apis/predict.proto``)."""
    return [file.name for file in descriptor_set().file]


@functools.cache
def module(file_name: str) -> types.ModuleType:
    """The namespace protoc's Python code of ``file_name`` would be, built from the private pool
    with the same builder generated modules call (so nested classes, enum wrappers and top-level
    enum values are where generated code has them)."""
    file = pool().FindFileByName(file_name)
    name = __name__ + "." + file_name.removesuffix(".proto").replace("/", ".") + "_pb2"
    namespace = types.ModuleType(name, f"Messages of {file_name} (modelmux's own definitions).")
    attributes: dict[str, Any] = namespace.__dict__
    attributes["DESCRIPTOR"] = file
    builder.BuildMessageAndEnumDescriptors(file, attributes)
    builder.BuildTopDescriptorsAndMessages(file, name, attributes)
    return namespace


def all_messages() -> list[Descriptor]:
    """Every message type defined here, nested ones included (map entries too)."""
    found: list[Descriptor] = []

    def walk(message: Descriptor) -> None:
        found.append(message)
        for nested in message.nested_types:
            walk(nested)

    for name in file_names():
        file: FileDescriptor = pool().FindFileByName(name)
        for message in file.message_types_by_name.values():
            walk(message)
    return found


class ReflectionPool:
    """What server reflection reads: the process's default pool first (its own services, health,
    reflection, API protos), then the private pool for TF Serving's names, which the default pool
    holds only in a process that imported TensorFlow's modules (there they are the same). A file
    comes whole from one pool, its dependencies with it. The private pool is built on first use,
    so a server that is never asked about TF Serving's names never builds it."""

    def _pools(self) -> Iterator[DescriptorPool]:
        yield descriptor_pool.Default()
        yield pool()

    def _first(self, method: str, name: str) -> Any:
        for each in self._pools():
            try:
                return getattr(each, method)(name)
            except KeyError:
                continue
        raise KeyError(name)

    def FindFileByName(self, file_name: str) -> FileDescriptor:
        found: FileDescriptor = self._first("FindFileByName", file_name)
        return found

    def FindFileContainingSymbol(self, symbol: str) -> FileDescriptor:
        found: FileDescriptor = self._first("FindFileContainingSymbol", symbol)
        return found

    def FindMessageTypeByName(self, full_name: str) -> Descriptor:
        found: Descriptor = self._first("FindMessageTypeByName", full_name)
        return found

    # Extensions are looked up in the pool of the message they extend (none here has any).
    def FindExtensionByNumber(self, message: Descriptor, number: int) -> FieldDescriptor:
        found: FieldDescriptor = message.file.pool.FindExtensionByNumber(message, number)
        return found

    def FindAllExtensions(self, message: Descriptor) -> list[FieldDescriptor]:
        found: list[FieldDescriptor] = message.file.pool.FindAllExtensions(message)
        return found


def reflection_pool() -> Any:
    """A :class:`ReflectionPool` (typed ``Any``: the reflection servicer is annotated for a
    DescriptorPool, of which it calls only these methods)."""
    return ReflectionPool()
