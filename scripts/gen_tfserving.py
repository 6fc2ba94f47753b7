#!/usr/bin/env python3
"""Compiles modelmux's own TF Serving definitions (protos/tfserving/) into the FileDescriptorSet
the gateway loads at run time (modelmux_common/tfserving_protos/descriptors.binpb).

``gen_tfserving.py [--out FILE]``; run by ``make proto`` (scripts/gen_protos.sh), and
``make proto-check`` fails when the committed set differs from what the sources give.

The set holds the files in dependency order, without source info (so without comments, as the
descriptors in protoc's generated Python code) and without protobuf's own well-known types, which
the loader takes from the installed protobuf. protoc records a JSON name on every field; the
generated code TensorFlow ships keeps only those written in the .proto, so the default ones are
dropped here: reflection then describes each field exactly as it describes TensorFlow's.
"""

from __future__ import annotations

import argparse
import importlib.resources
import subprocess
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ROOT / "protos" / "tfserving"
OUT = ROOT / "modelmux_common" / "tfserving_protos" / "descriptors.binpb"
WELL_KNOWN = "google/protobuf/"


def default_json_name(name: str) -> str:
    """protoc's JSON name of a field: underscores dropped, the letter after each capitalised."""
    out: list[str] = []
    upper = False
    for char in name:
        if char == "_":
            upper = True
        elif upper:
            out.append(char.upper())
            upper = False
        else:
            out.append(char)
    return "".join(out)


def _strip_json_names(message: descriptor_pb2.DescriptorProto) -> None:
    for field in message.field:
        if field.json_name == default_json_name(field.name):
            field.ClearField("json_name")
    for nested in message.nested_type:
        _strip_json_names(nested)


def compile_set(sources: Path) -> descriptor_pb2.FileDescriptorSet:
    """Every .proto under ``sources`` (its own include root), imports first."""
    names = sorted(p.relative_to(sources).as_posix() for p in sources.rglob("*.proto"))
    include = importlib.resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.binpb"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{sources}",
                f"-I{include}",
                "--include_imports",
                f"--descriptor_set_out={out}",
                *names,
            ],
            check=True,
        )
        compiled = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    result = descriptor_pb2.FileDescriptorSet()
    for file in compiled.file:
        if file.name.startswith(WELL_KNOWN):
            continue
        for message in file.message_type:
            _strip_json_names(message)
        result.file.append(file)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    data = compile_set(SOURCES).SerializeToString(deterministic=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)


if __name__ == "__main__":
    main()
