"""Live reloading from a local folder onto a single backend: the in-place rewrite of the version
that is "latest" must not fail one call even though no other backend can take over."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import Proc, start_daemon
from gateway_helpers import wait_for
from test_live_reload import V1_Y, V2_Y, Load

POLL = 1.0


@pytest.fixture(scope="module")
def local_stack(
    tmp_path_factory: pytest.TempPathFactory, example_models: Path
) -> Iterator[tuple[Path, Proc]]:
    root = tmp_path_factory.mktemp("local")
    source = root / "source" / "half_plus_two"
    shutil.copytree(example_models / "half_plus_two" / "1", source / "1")
    backend = start_daemon(["backend", "--listen", "127.0.0.1:0", "--poll-interval", "200ms"])
    config = root / "modelmux.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "gateway": {
                    "listen": "127.0.0.1:0",
                    "status_interval": "200ms",
                    "log_requests": False,
                },
                "modelsync": {
                    "listen": "127.0.0.1:0",
                    "target": str(root / "volume"),
                    "poll_interval": f"{POLL}s",
                    "settle": "0s",
                    "debounce": "200ms",
                },
                "backends": [{"name": "only", "address": backend.address}],
                "apis": [
                    {
                        "name": "hpt",
                        "handler": {
                            "models": {"paths": [{"name": "half_plus_two", "path": str(source)}]}
                        },
                    }
                ],
            }
        )
    )
    sync = start_daemon(["sync", "--config", str(config)])
    gateway = start_daemon(
        ["gateway", "--config", str(config)], env={"MODELMUX_GATEWAY_MODELSYNC": sync.address}
    )
    yield source, gateway
    for proc in (gateway, sync, backend):
        proc.stop()


def replace_folder(source: Path, target: Path) -> None:
    """Rewrites a version folder in place, file by file, as a careless deploy script would."""
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        dest = target / path.relative_to(source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)


async def test_in_place_rewrite_of_latest_on_one_backend(
    local_stack: tuple[Path, Proc], example_models: Path
) -> None:
    source, gateway = local_stack
    load = Load(gateway.address)
    task = asyncio.create_task(load.run("half_plus_two", "own"))
    try:
        await wait_for(lambda: load.served("half_plus_two", 1, V1_Y, 0), timeout=60, what="v1")
        started = time.monotonic()
        replace_folder(example_models / "half_plus_two" / "2", source / "2")
        await wait_for(
            lambda: load.served("half_plus_two", 2, V2_Y, started),
            timeout=POLL + 5,
            what="v2 added",
        )
        print(f"local propagation (added): {time.monotonic() - started:.2f} s")
        rewritten = time.monotonic()
        replace_folder(
            example_models / "half_plus_two" / "1", source / "2"
        )  # v2 now computes 0.5x + 2
        await wait_for(
            lambda: load.served("half_plus_two", 2, V1_Y, rewritten),
            timeout=POLL + 5,
            what="v2 rewritten",
        )
        print(f"local propagation (rewritten in place): {time.monotonic() - rewritten:.2f} s")
        assert not load.failures(started), load.failures(started)[
            :5
        ]  # (before v1 loaded, calls wait)
    finally:
        load.stop.set()
        await task
