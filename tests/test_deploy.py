"""deploy/ without a cluster: every overlay renders and passes the Kubernetes schemas (a broken
manifest does not), the modelmux configs in its ConfigMaps load with the project's own loader,
grace periods cover gateway.shutdown_grace, hadolint passes the Dockerfiles (and fails a bad
one), and the Grafana dashboard queries only metrics modelmux exports (and a wrong name fails)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT

from modelmux_common import config as config_mod

spec = importlib.util.spec_from_file_location("deploy_check", ROOT / "deploy" / "check.py")
assert spec is not None and spec.loader is not None
check = importlib.util.module_from_spec(spec)
sys.modules["deploy_check"] = check
spec.loader.exec_module(check)

OVERLAYS = {overlay.name: check.render(overlay) for overlay in check.overlays()}


def pod_specs(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for obj in objects:
        if obj["kind"] in {"Deployment", "DaemonSet", "Job"}:
            out.append((obj["metadata"]["name"], obj["spec"]["template"]["spec"]))
    return out


def modelmux_configs(objects: list[dict[str, Any]]) -> dict[str, str]:
    """ConfigMap name -> the modelmux YAML it carries."""
    return {
        obj["metadata"]["name"]: obj["data"]["modelmux.yaml"]
        for obj in objects
        if obj["kind"] == "ConfigMap" and "modelmux.yaml" in obj.get("data", {})
    }


def test_every_overlay_renders_and_is_valid() -> None:
    assert set(OVERLAYS) >= {"production", "cpu", "sidecar", "workers"}
    for name, objects in OVERLAYS.items():
        assert objects, name
        assert check.validate(objects, where=name) == []


def test_the_validator_rejects_a_broken_manifest() -> None:
    gateway = next(
        o
        for o in OVERLAYS["production"]
        if o["kind"] == "Deployment" and o["metadata"]["name"] == "modelmux-gateway"
    )
    broken = copy.deepcopy(gateway)
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["grpc"]["prot"] = container["readinessProbe"]["grpc"].pop("port")
    errors = check.validate([broken], where="test")
    assert errors and any("prot" in e or "port" in e for e in errors), errors
    wrong_type = copy.deepcopy(gateway)
    wrong_type["spec"]["replicas"] = "two"
    assert check.validate([wrong_type], where="test")


def test_the_production_shape() -> None:
    objects = OVERLAYS["production"]
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert {
        ("Deployment", "modelmux-gateway"),
        ("Deployment", "modelmux-gateway-manager"),
        ("Service", "modelmux-gateway"),
        ("PodDisruptionBudget", "modelmux-gateway"),
        ("DaemonSet", "modelmux-modelsync"),
        ("Deployment", "tfserving-gpu"),
        ("Deployment", "tfserving-inferentia"),
    } <= kinds
    headless = {
        o["metadata"]["name"]
        for o in objects
        if o["kind"] == "Service" and o["spec"].get("clusterIP") == "None"
    }
    assert headless == {"tfserving-gpu", "tfserving-inferentia"}
    specs = dict(pod_specs(objects))
    gpu = specs["tfserving-gpu"]["containers"][0]["resources"]["limits"]
    neuron = specs["tfserving-inferentia"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == 1 and neuron["aws.amazon.com/neuron"] == 1
    account = next(
        o
        for o in objects
        if o["kind"] == "ServiceAccount" and o["metadata"]["name"] == "modelmux-modelsync"
    )
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith(
        "arn:aws:iam::"
    )
    assert specs["modelmux-modelsync"]["serviceAccountName"] == "modelmux-modelsync"
    for name, pod in specs.items():
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            assert container["resources"]["requests"], f"{name}/{container['name']} has no requests"


def test_configmaps_load_with_the_project_loader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for env in [k for k in os.environ if k.startswith("MODELMUX_")]:
        monkeypatch.delenv(env)
    loaded = 0
    for overlay, objects in OVERLAYS.items():
        for name, text in modelmux_configs(objects).items():
            path = tmp_path / overlay / name / "modelmux.yaml"
            path.parent.mkdir(parents=True)
            path.write_text(text)
            config = config_mod.load(path)
            assert config.backends and config.apis, f"{overlay}/{name}"
            assert not config.gateway.manage_backends, "route-only unless told otherwise"
            loaded += 1
    assert loaded == len(OVERLAYS)
    # the manager pod turns management on through the environment, and the loader takes it
    production = next(iter(modelmux_configs(OVERLAYS["production"]).values()))
    path = tmp_path / "manager.yaml"
    path.write_text(production)
    manager = next(
        p for n, p in pod_specs(OVERLAYS["production"]) if n == "modelmux-gateway-manager"
    )
    for item in manager["containers"][0]["env"]:
        monkeypatch.setenv(item["name"], item["value"])
    assert config_mod.load(path).gateway.manage_backends


def test_grace_periods_cover_the_gateways_shutdown_grace(tmp_path: Path) -> None:
    """Every pod running `modelmux gateway`: terminationGracePeriodSeconds >= its preStop sleep +
    gateway.shutdown_grace from the ConfigMap it mounts + a few seconds to close."""
    checked = 0
    for overlay, objects in OVERLAYS.items():
        configs = modelmux_configs(objects)
        for name, pod in pod_specs(objects):
            maps = {v["name"]: v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v}
            for container in pod.get("containers", []) + pod.get("initContainers", []):
                if container.get("args", [""])[0] != "gateway":
                    continue
                mount = next(
                    m for m in container["volumeMounts"] if m["mountPath"] == "/etc/modelmux"
                )
                path = tmp_path / f"{overlay}-{name}.yaml"
                path.write_text(configs[maps[mount["name"]]])
                grace = config_mod.load(path).gateway.shutdown_grace
                sleep = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {})
                needed = sleep.get("seconds", 0) + grace + 3
                assert pod["terminationGracePeriodSeconds"] >= needed, (overlay, name)
                checked += 1
    assert checked >= 5


def test_probes_use_grpc_health() -> None:
    specs = dict(pod_specs(OVERLAYS["production"]) + pod_specs(OVERLAYS["sidecar"]))
    gateway = specs["modelmux-gateway"]["containers"][0]
    assert gateway["readinessProbe"]["grpc"]["port"] == 8500
    sidecar = specs["example-app"]["initContainers"][0]
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["readinessProbe"]["exec"]["command"][:3] == [
        "python",
        "-m",
        "modelmux.client.probe",
    ]


def test_hadolint_passes_ours_and_fails_a_bad_dockerfile(tmp_path: Path) -> None:
    ours = check.hadolint(sorted((ROOT / "deploy" / "docker").glob("*.Dockerfile")))
    assert ours.returncode == 0, ours.stdout
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install numpy\nCMD python app.py\n")
    linted = check.hadolint([bad])
    assert linted.returncode != 0
    assert "DL3007" in linted.stdout  # the latest tag
    assert "DL3013" in linted.stdout  # an unpinned pip install


def test_images_are_non_root_and_probe_grpc_health() -> None:
    for dockerfile in (ROOT / "deploy" / "docker").glob("*.Dockerfile"):
        text = dockerfile.read_text()
        final = text.split("\nFROM ")[-1]
        assert "USER 10001:10001" in final, dockerfile.name
        assert 'CMD ["python", "-m", "modelmux.client.probe"' in final, dockerfile.name
    gateway = (ROOT / "deploy" / "docker" / "gateway.Dockerfile").read_text()
    assert "pip install --no-cache-dir ." in gateway and "backend" not in gateway.split("FROM")[2]
    assert yaml.safe_load((ROOT / "deploy" / "k8s" / "base" / "kustomization.yaml").read_text())


def test_the_dashboard_queries_only_exported_metrics(tmp_path: Path) -> None:
    assert check.dashboards() == []
    names = check.exported()
    assert {"modelmux_requests_total", "modelmux_embedded_model_versions"} <= names
    board = json.loads((check.GRAFANA / "modelmux.json").read_text())
    queried = {
        n for p in check.panels(board) for t in p["targets"] for n in check._NAME.findall(t["expr"])
    }
    assert len(queried) >= 25  # the panels cover the metrics, not a few of them
    broken = copy.deepcopy(board)
    broken["panels"][1]["targets"][0]["expr"] = "rate(modelmux_request_total[5m])"
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    [problem] = check.problems(path, names)
    assert "modelmux_request_total is not a metric modelmux exports" in problem
    path.write_text("{")
    assert check.problems(path, names)[0].startswith("broken.json: not JSON")
