"""The ``modelmux`` command's own surface: --version, --help, and what daemons say at start."""

from __future__ import annotations

import importlib.metadata
import subprocess
from pathlib import Path

import yaml
from conftest import MODELMUX, ROOT, start_daemon


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MODELMUX, *args], capture_output=True, text=True, timeout=60, cwd=ROOT, check=True
    )


def test_version() -> None:
    assert run("--version").stdout == f"modelmux {importlib.metadata.version('modelmux')}\n"


def test_help_is_plain_text() -> None:
    text = run("--help").stdout
    assert "``" not in text and ":func:" not in text, text
    for command in ("backend", "gateway", "sync", "up", "job"):
        assert f"    {command} " in text


def test_modelsync_start_line_names_a_shared_source_once(
    tmp_path: Path, example_models: Path
) -> None:
    """Two APIs that serve one folder under two model names: one source, listed once."""
    shared = str(example_models / "iris")
    config = tmp_path / "modelmux.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "gateway": {"modelsync": "127.0.0.1:1"},
                "modelsync": {"listen": "127.0.0.1:0", "target": str(tmp_path / "volume")},
                "apis": [
                    {
                        "name": "a",
                        "handler": {"models": {"paths": [{"name": "a", "path": shared}]}},
                    },
                    {
                        "name": "b",
                        "handler": {"models": {"paths": [{"name": "b", "path": shared}]}},
                    },
                ],
            }
        )
    )
    sync = start_daemon(["sync", "--config", str(config)])
    try:
        serving = next(line for line in sync.lines if line.get("event") == "serving")
        assert serving["sources"] == [shared], serving
    finally:
        assert sync.stop() == 0
