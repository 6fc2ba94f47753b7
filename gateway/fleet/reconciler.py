"""One backend's reconciler: the only writer of that backend's state.

TF Serving replaces the whole config on every HandleReloadConfigRequest, so the reconciler always
sends the complete desired config, one reload in flight, then polls GetModelStatus. It keeps the
backend's push/poll/retry state (what was pushed, what it reports, failed loads and their retry
schedule) and hands the table builder an immutable :class:`~gateway.fleet.report.Report` of it,
calling ``changed`` whenever that report changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc
import structlog

from gateway.catalog import Servable
from gateway.fleet.desired import Desired, wanted
from gateway.fleet.report import Report, Statuses
from gateway.routing import Endpoint
from gateway.transport import AVAILABLE, END, Transport, VersionStatus
from modelmux_common.config import BackendConfig, GatewayConfig
from modelmux_common.tfserving import model_server_config_pb2

log = structlog.get_logger("modelmux.gateway")

CONVERGING_POLL = 0.2
LOAD_RETRY = 2.0
MAX_LOAD_RETRY = 120.0
STALE_FAILURE = 10.0
MAX_BACKOFF = 5.0


def model_server_config(servables: Sequence[Servable]) -> Any:
    config = model_server_config_pb2.ModelServerConfig()
    for servable in servables:
        entry = config.model_config_list.config.add()
        entry.name = servable.name
        entry.base_path = servable.base_path
        entry.model_platform = "tensorflow"
        entry.model_version_policy.specific.versions.extend(servable.versions)
    return config


class Reconciler:
    def __init__(
        self,
        config: BackendConfig,
        transport: Transport,
        *,
        gateway: GatewayConfig,
        desired: Callable[[], Desired],
        changed: Callable[[], None],
    ) -> None:
        self.config = config
        self.name = config.name
        self.transport = transport
        self.endpoint = Endpoint(config.name, config.address, transport, poke=self.poke)
        self._gateway = gateway
        self._desired = desired
        self._changed = changed
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.reachable = False
        self.last_error = ""
        # servable -> version -> status: the last poll, less what a push is about to unload
        self._status: dict[str, dict[int, VersionStatus]] = {}
        # what the last status poll returned, never pruned ahead of a push
        self._reported: dict[str, dict[int, VersionStatus]] = {}
        # the config last accepted by the backend; None forces a push
        self._pushed: Any = None
        # (servable, version) that failed to load -> (attempts, monotonic time of the next try)
        self._failures: dict[tuple[str, int], tuple[int, float]] = {}
        # failed versions whose retry has been scheduled but not yet seen starting
        self._retrying: set[tuple[str, int]] = set()
        self._available_since: dict[tuple[str, int], float] = {}
        self._load_errors: dict[tuple[str, int], str] = {}

    def __repr__(self) -> str:
        return f"Reconciler({self.name}@{self.config.address})"

    def report(self) -> Report:
        return Report(
            config=self.config,
            endpoint=self.endpoint,
            reachable=self.reachable,
            last_error=self.last_error,
            status=dict(self._status),
            reported=dict(self._reported),
            pushed=self._pushed is not None,
            load_errors=dict(self._load_errors),
            available_since=dict(self._available_since),
            retry_at={key: at for key, (_, at) in self._failures.items()},
        )

    def wanted(self) -> list[Servable]:
        return wanted(self._desired(), self.report(), time.monotonic())

    def poke(self) -> None:
        """Look at the backend now (desired state changed, or a call it never ran)."""
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"reconcile-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            self._wake.clear()
            wait, backoff = await self.step(backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def step(self, backoff: float = 0.1) -> tuple[float, float]:
        """One round, its failures handled: (seconds until the next, the next backoff)."""
        try:
            converged = await self.round()
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and self.reachable:
                # busy (a long load), not gone: keep routing what it holds, ask again
                self._pushed = None
                log.warning("backend_slow", backend=self.name, error=str(exc.details()))
            else:
                self._mark_unreachable(f"{exc.code().name}: {exc.details()}")
        except RuntimeError as exc:
            self.last_error = str(exc)
            log.warning("backend_reload_failed", backend=self.name, error=str(exc))
        except Exception:  # the edge of a background task: log, back off, keep converging
            log.exception("reconcile_failed", backend=self.name)
        else:
            return (self._gateway.status_interval if converged else CONVERGING_POLL), 0.1
        return backoff, min(backoff * 2, MAX_BACKOFF)

    async def round(self) -> bool:
        """Push the config if it changed, poll status; True when nothing is still loading."""
        gw = self._gateway
        manage = self._desired().manage
        timeout = min(gw.backend_timeout, 10.0)
        wanted = self.wanted()
        config = model_server_config(wanted)
        pushed_now = False
        if not manage:
            self._pushed = config  # the first worker owns the backends' configuration
        elif config != self._pushed:
            pushed_now = True
            self._forget_unwanted(wanted)
            # TF Serving answers a reload adding new model names only once they loaded
            await self.transport.reload(config, timeout=max(gw.backend_timeout, gw.load_timeout))
            self._pushed = config
            log.info("backend_configured", backend=self.name, servables=[s.name for s in wanted])
        status: dict[str, dict[int, VersionStatus]] = {}
        for servable in wanted:
            reported = await self.transport.model_status(servable.name, timeout=timeout)
            if reported is None and not manage:
                continue  # not configured (yet) by the first worker
            if reported is None:
                self._pushed = None  # the backend lost its config (restarted): push again
                self._changed()  # and its calls for latest are pinned until it has it again
                return False
            status[servable.name] = reported
        if not self.reachable:
            log.info("backend_reachable", backend=self.name, address=self.config.address)
        self.reachable, self.last_error = True, ""
        self._track_failures(status)
        keep = {(s.name, v) for s in wanted for v in s.versions} | set(self._failures)
        self._available_since = {k: t for k, t in self._available_since.items() if k in keep}
        self._load_errors = {k: e for k, e in self._load_errors.items() if k in keep}
        self._retrying &= keep
        if pushed_now or status != self._status or status != self._reported:
            self._log_failures(status)
            self._status = status
            self._reported = dict(status)
            self._changed()
        if model_server_config(self.wanted()) != self._pushed:
            return False
        return all(
            status.get(s.name, {}).get(v, VersionStatus(0)).state in (AVAILABLE, END)
            for s in wanted
            for v in s.versions
        )

    def _forget_unwanted(self, wanted: Sequence[Servable]) -> None:
        """Routing leaves what a config push is about to unload before the push goes out."""
        keep = {(s.name, v) for s in wanted for v in s.versions}
        pruned = {
            name: {
                v: st for v, st in versions.items() if (name, v) in keep or st.state != AVAILABLE
            }
            for name, versions in self._status.items()
        }
        if pruned != self._status:
            self._status = pruned
            self._changed()

    def _track_failures(self, status: Statuses) -> None:
        now = time.monotonic()
        for name, versions in status.items():
            for version, entry in versions.items():
                key = (name, version)
                if entry.state != AVAILABLE:
                    self._available_since.pop(key, None)
                if entry.state == AVAILABLE:
                    self._available_since.setdefault(key, now)
                    self._failures.pop(key, None)
                    self._load_errors.pop(key, None)
                elif entry.state != END:
                    self._retrying.discard(key)  # the retry is under way
                elif entry.error:
                    self._load_errors[key] = entry.error
                    self._schedule_retry(key, now)

    def _schedule_retry(self, key: tuple[str, int], now: float) -> None:
        attempts, retry_at = self._failures.get(key, (0, 0.0))
        # right after a retry was sent the old failure may still be reported
        stale = key in self._retrying and now < retry_at + STALE_FAILURE
        if retry_at <= now and not stale:
            delay = min(LOAD_RETRY * 2**attempts, MAX_LOAD_RETRY)
            self._failures[key] = (attempts + 1, now + delay)
            self._retrying.add(key)
            log.warning(
                "version_load_retry_scheduled",
                backend=self.name,
                servable=key[0],
                version=key[1],
                attempt=attempts + 1,
                seconds=delay,
            )

    def _log_failures(self, status: Mapping[str, Mapping[int, VersionStatus]]) -> None:
        for name, versions in status.items():
            for version, entry in versions.items():
                seen = self._status.get(name, {}).get(version)
                if entry.error and (seen is None or seen.error != entry.error):
                    log.warning(
                        "version_load_failed",
                        backend=self.name,
                        servable=name,
                        version=version,
                        error=entry.error,
                    )

    def _mark_unreachable(self, error: str) -> None:
        if self.reachable or not self.last_error:
            log.warning(
                "backend_unreachable", backend=self.name, address=self.config.address, error=error
            )
        self.reachable, self.last_error, self._pushed = False, error, None
        if self._status:
            self._status, self._reported = {}, {}
            self._changed()
