"""Backends named by DNS: ``dns:///name:port`` is re-resolved periodically and every address it
yields is a backend of its own (a Kubernetes headless Service of TF Serving pods, for example)."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import Sequence

import structlog

from gateway.fleet.fleet import Fleet
from modelmux_common.config import BackendConfig

log = structlog.get_logger("modelmux.gateway")


def split_target(address: str) -> tuple[str, int]:
    """``dns:///name:port`` (or ``dns:name:port``) -> (name, port)."""
    rest = address.removeprefix("dns:").lstrip("/")
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{address!r} is not dns:///name:port")
    return host.strip("[]"), int(port)


async def resolve(entry: BackendConfig) -> dict[str, BackendConfig]:
    """The backends an entry stands for now: name -> config with a concrete address."""
    host, port = split_target(entry.address)
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out = {}
    tls = entry.tls
    if tls is not None and not tls.server_name:  # the certificate names the DNS name, not an IP
        tls = dataclasses.replace(tls, server_name=host)
    for family, _, _, _, sockaddr in infos:
        ip = str(sockaddr[0])
        address = f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
        name = f"{entry.name}/{address}"
        out[name] = dataclasses.replace(entry, name=name, address=address, tls=tls)
    return out


class Discovery:
    """Keeps the fleet's backends in step with what the DNS entries resolve to."""

    def __init__(self, fleet: Fleet, entries: Sequence[BackendConfig], *, interval: float) -> None:
        self.fleet = fleet
        self.entries = [e for e in entries if e.address.startswith("dns:")]
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        for entry in self.entries:
            try:
                found = await resolve(entry)
            except (OSError, UnicodeError, ValueError) as exc:
                # keep what we have: a resolver hiccup must not empty the fleet
                log.warning(
                    "dns_resolve_failed", backend=entry.name, address=entry.address, error=str(exc)
                )
                continue
            prefix = f"{entry.name}/"
            have = {name for name in self.fleet.names if name.startswith(prefix)}
            for name in sorted(found.keys() - have):
                self.fleet.add(found[name])
            for name in sorted(have - found.keys()):
                await self.fleet.remove(name)

    def start(self) -> None:
        if self.entries:
            self._task = asyncio.create_task(self._run(), name="dns-discovery")

    async def _run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.interval)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
