"""The client distribution (clients/pyproject.toml) on its own: a fresh virtualenv installs it
without grpcio-tools or TensorFlow, runs the client example against a live gateway, and code using
it passes mypy --strict against the installed package (its py.typed and .pyi files)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from client_helpers import start_client_gateway
from conftest import ROOT, Proc

CHECK_IMPORTS = """
import importlib.util, sys
import modelmux.client, modelmux.v1.inference_pb2
missing = [m for m in ("tensorflow", "grpc_tools", "tensorflow_serving", "gateway", "backend")
           if importlib.util.find_spec(m) is not None]
assert not missing, f"installed but must not be: {missing}"
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "grpc_tools"))
assert not loaded, loaded
print(modelmux.client.__file__)
"""

MISUSED = """
import numpy as np
from modelmux.client import Client

with Client() as client:
    result = client.predict("m", {"x": np.zeros(2)}, version="1")
    count: int = result.model
"""


def base_python() -> str:
    """The interpreter the test venv was made from (a venv of a venv would inherit nothing, but
    say so plainly)."""
    return getattr(sys, "_base_executable", sys.executable)


@pytest.fixture(scope="module")
def client_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The client distribution built as a wheel, from a copy of clients/."""
    root = tmp_path_factory.mktemp("client-dist")
    source = root / "src"
    shutil.copytree(
        ROOT / "clients",
        source,
        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "node_modules", "ts"),
    )
    built = root / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check",
         "-w", str(built), str(source)],
        check=True,
        timeout=300,
    )  # fmt: skip
    (wheel,) = built.glob("modelmux_client-*.whl")
    return wheel


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory, client_wheel: Path) -> Path:
    venv = tmp_path_factory.mktemp("client-venv") / "venv"
    subprocess.run([base_python(), "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [
        str(venv / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "-q",
        "--disable-pip-version-check",
    ]
    subprocess.run([*pip, f"{client_wheel}[typing]"], check=True, timeout=600)
    return venv


def test_every_package_in_the_wheel_is_typed(client_wheel: Path) -> None:
    """PEP 561: each package the wheel ships carries py.typed, and every generated module its
    .pyi stub."""
    with zipfile.ZipFile(client_wheel) as wheel:
        names = set(wheel.namelist())
    packages = sorted(n.removesuffix("/__init__.py") for n in names if n.endswith("/__init__.py"))
    assert {"modelmux", "modelmux/client", "modelmux/v1"} <= set(packages), packages
    untyped = [p for p in packages if f"{p}/py.typed" not in names]
    assert not untyped, f"packages without py.typed: {untyped}"
    generated = [n for n in names if n.endswith(("_pb2.py", "_pb2_grpc.py"))]
    assert generated and not [n for n in generated if f"{n}i" not in names]
    # the source tree's packages are the wheel's: none is left out of the build
    ours = sorted(
        str(p.parent.relative_to(ROOT / "clients"))
        for p in (ROOT / "clients" / "modelmux").rglob("__init__.py")
    )
    assert packages == ours


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, example_models: Path, backend: Proc
) -> Iterator[Proc]:
    proc = start_client_gateway(
        tmp_path_factory.mktemp("install-gw"), models=example_models, backend=backend
    )
    yield proc
    proc.stop()


def run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        [str(venv / "bin" / "python"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_installs_alone_and_calls_a_live_gateway(
    client_venv: Path, gateway: Proc, tmp_path: Path
) -> None:
    imported = run(client_venv, "-c", CHECK_IMPORTS, cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    assert str(client_venv) in imported.stdout  # the installed copy, not the source tree
    example = run(
        client_venv, str(ROOT / "clients/examples/predict.py"), gateway.address, cwd=tmp_path
    )
    assert example.returncode == 0, example.stderr
    assert "latest: version 2, y = [3.5, 4.0, 5.5]" in example.stdout
    assert "stable: version 1" in example.stdout and "version 99: NOT_FOUND" in example.stdout
    assert "versions answered concurrently: [1, 2]" in example.stdout
    probe = run(client_venv, "-m", "modelmux.client.probe", gateway.address, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    assert (client_venv / "bin" / "modelmux-probe").exists()


def test_mypy_strict_on_code_using_the_installed_client(client_venv: Path, tmp_path: Path) -> None:
    shutil.copy(ROOT / "clients/examples/predict.py", tmp_path / "predict.py")
    (tmp_path / "misused.py").write_text(MISUSED)
    (tmp_path / "mypy.ini").write_text("[mypy]\n")  # none of the project's settings
    mypy = [
        sys.executable,
        "-m",
        "mypy",
        "--strict",
        "--config-file",
        "mypy.ini",
        "--no-incremental",
        "--python-executable",
        str(client_venv / "bin" / "python"),
    ]
    good = subprocess.run(
        [*mypy, "predict.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert good.returncode == 0, good.stdout + good.stderr
    bad = subprocess.run(
        [*mypy, "misused.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 1, bad.stdout
    assert 'Argument "version" to "predict" of "Client" has incompatible type "str"' in bad.stdout
    assert 'Incompatible types in assignment (expression has type "str"' in bad.stdout
