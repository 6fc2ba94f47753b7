#!/usr/bin/env bash
# Regenerates the Python code of our own protos into clients/ (proto path = import path).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
find clients/modelmux -name '*_pb2*.py' -delete -o -name '*_pb2*.pyi' -delete
# protos/tfserving (TF Serving's messages) is not generated here: see the end.
mapfile -t protos < <(cd protos && find . -path ./tfserving -prune -o -name '*.proto' -print | sed 's|^\./||' | sort)
"$PY" -m grpc_tools.protoc -I protos \
  --python_out=clients --mypy_out=clients \
  --grpc_python_out=clients --mypy_grpc_out=clients \
  --plugin=protoc-gen-mypy="$(dirname "$PY")/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="$(dirname "$PY")/protoc-gen-mypy_grpc" \
  "${protos[@]}"
# Every folder on the way is a regular package, and a typed one (PEP 561: py.typed in each, so
# every package the client distribution ships says so, whichever a checker looks at).
find clients/modelmux -type d ! -name __pycache__ -exec sh -c 'test -f "$1/__init__.py" || : > "$1/__init__.py"; test -f "$1/py.typed" || : > "$1/py.typed"' _ {} \;
# modelmux's own TF Serving definitions: a FileDescriptorSet the gateway loads into a private
# pool at run time (no generated Python module registers them in the default pool).
"$PY" scripts/gen_tfserving.py
