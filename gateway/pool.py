"""The backend pool: one connection and one reconciler per TF Serving backend.

Each reconciler owns its backend's model configuration: TF Serving replaces the whole config on
every HandleReloadConfigRequest, so it always sends the complete desired config, one reload in
flight, then polls GetModelStatus. The pool turns what the backends report into the routing table.

When a version's content is replaced (a new servable for the same model version), the old servable
stays in a backend's config until the new one is AVAILABLE on that backend, and routing keeps using
the old one until then; the old one is unloaded only after routing moved away.

Every model the gateway knows (named by the config, published or refused by modelsync) gets a
:class:`~gateway.routing.ModelStatus` in the table: routable, or why not (modelsync's refusal,
the backends' load error, a failing source, a placement no backend matches, still loading).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import structlog

from gateway.catalog import DesiredModel, Expected, Problems, Servable, refusal_text
from gateway.routing import (
    FAILED,
    LOADING,
    PENDING,
    REFUSED,
    SOURCE_FAILING,
    ModelStatus,
    Route,
    Table,
    Target,
)
from modelmux_common.config import BackendConfig, GatewayConfig
from modelmux_common.grpcutil import message_size_options
from modelmux_common.tfserving import (
    get_model_status_pb2,
    model_management_pb2,
    model_server_config_pb2,
)

log = structlog.get_logger("modelmux.gateway")

VersionState = get_model_status_pb2.ModelVersionStatus.State
AVAILABLE = VersionState.AVAILABLE
END = VersionState.END

_PS = "/tensorflow.serving.PredictionService/"
_MS = "/tensorflow.serving.ModelService/"
FORWARDED_METHODS = ("Predict", "Classify", "Regress", "MultiInference", "GetModelMetadata")

CONVERGING_POLL = 0.2
LOAD_RETRY = 2.0
MAX_LOAD_RETRY = 120.0
STALE_FAILURE = 10.0
MAX_BACKOFF = 5.0


@dataclass(frozen=True, slots=True)
class VersionStatus:
    state: int
    error: str = ""


class Backend:
    """A TF Serving backend: its channel, raw-bytes call handles and last reported state."""

    def __init__(self, config: BackendConfig, gateway: GatewayConfig) -> None:
        self.config = config
        self.name = config.name
        self.address = config.address
        self.accelerator = config.accelerator
        self.outstanding = 0
        options = [
            *message_size_options(gateway.max_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
            ("grpc.keepalive_time_ms", 30000),
        ]
        self.channel = grpc.aio.insecure_channel(config.address, options=options)
        # raw bytes both ways: no (de)serializer, so gRPC calls no Python function per message
        self.calls: dict[str, grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = {
            method: self.channel.unary_unary(_PS + method) for method in FORWARDED_METHODS
        }
        self._status = self.channel.unary_unary(
            _MS + "GetModelStatus",
            request_serializer=get_model_status_pb2.GetModelStatusRequest.SerializeToString,
            response_deserializer=get_model_status_pb2.GetModelStatusResponse.FromString,
        )
        self._reload = self.channel.unary_unary(
            _MS + "HandleReloadConfigRequest",
            request_serializer=model_management_pb2.ReloadConfigRequest.SerializeToString,
            response_deserializer=model_management_pb2.ReloadConfigResponse.FromString,
        )
        self.reachable = False
        self.last_error = ""
        # servable -> version -> status, as last reported
        self.status: dict[str, dict[int, VersionStatus]] = {}
        # what the last status poll returned, never pruned ahead of a push (see Pool._targets)
        self.reported: dict[str, dict[int, VersionStatus]] = {}
        # the config last accepted by the backend; None forces a push
        self.pushed: Any = None
        # (servable, version) that failed to load -> (attempts, monotonic time of the next try)
        self.failures: dict[tuple[str, int], tuple[int, float]] = {}
        # passive outlier ejection: consecutive failed calls, and until when routing avoids it
        self.call_failures = 0
        self.ejected_until = 0.0
        # failed versions whose retry has been scheduled but not yet seen starting
        self.retrying: set[tuple[str, int]] = set()
        # (servable, version) -> monotonic time it was first seen AVAILABLE
        self.available_since: dict[tuple[str, int], float] = {}
        # (servable, version) -> the last load error reported, until it is AVAILABLE
        self.load_errors: dict[tuple[str, int], str] = {}

    def __repr__(self) -> str:
        return f"Backend({self.name}@{self.address})"

    def available(self, servable: str, version: int) -> bool:
        status = self.status.get(servable, {}).get(version)
        return status is not None and status.state == AVAILABLE

    async def reload(self, config: Any, timeout: float) -> None:
        request = model_management_pb2.ReloadConfigRequest(config=config)
        response = await self._reload(request, timeout=timeout)
        if response.status.error_code:
            raise RuntimeError(
                response.status.error_message or f"error {response.status.error_code}"
            )
        self.pushed = config

    async def servable_status(self, name: str, timeout: float) -> dict[int, VersionStatus] | None:
        """The servable's versions on this backend; None when the backend does not know it."""
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = name
        try:
            response = await self._status(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return {
            s.version: VersionStatus(s.state, s.status.error_message if s.status.error_code else "")
            for s in response.model_version_status
        }

    async def close(self, grace: float | None = None) -> None:
        await self.channel.close(grace=grace)


def _config(servables: Sequence[Servable]) -> Any:
    config = model_server_config_pb2.ModelServerConfig()
    for servable in servables:
        entry = config.model_config_list.config.add()
        entry.name = servable.name
        entry.base_path = servable.base_path
        entry.model_platform = "tensorflow"
        entry.model_version_policy.specific.versions.extend(servable.versions)
    return config


class Pool:
    """All backends, their reconcilers, and the routing table built from what they report."""

    def __init__(
        self,
        *,
        config: GatewayConfig,
        backends: Sequence[BackendConfig],
        models: Mapping[str, DesiredModel],
        labels: Mapping[str, Mapping[str, int]],
        on_change: Callable[[Table], None] | None = None,
        manage: bool = True,
        expected: Mapping[str, Expected] | None = None,
    ) -> None:
        self.config = config
        # False in gateway workers other than the first: they watch backends, never configure them
        self.manage = manage
        # With several workers, a replaced servable stays loaded this long after its successor is
        # AVAILABLE, so that every worker (each polling on its own) routes away from it first.
        self.hold = 2 * config.status_interval + 1.0 if config.workers > 1 else 0.0
        # dns:///name:port entries are expanded by gateway.discovery into one backend per address
        self.backends = [Backend(b, config) for b in backends if not b.address.startswith("dns:")]
        # every configured backend, dns:/// entries included: where a model could be placed
        self.backend_configs = tuple(backends)
        # models the config names: listed (and waited for) before anything is published
        self.expected: dict[str, Expected] = dict(expected or {})
        # what modelsync refuses and which sources fail (see gateway.follower)
        self.problems = Problems()
        self.models: dict[str, DesiredModel] = dict(models)
        # labels as asked (config or admin RPC) and as in force: a label moves only once its new
        # target is AVAILABLE on every reachable backend the model is placed on
        self.labels = {m: dict(v) for m, v in labels.items()}
        self.effective: dict[str, dict[str, int]] = {m: dict(v) for m, v in labels.items()}
        # model -> version -> weight of "latest" traffic
        self.splits: dict[str, dict[int, int]] = {}
        # (model, version) removed -> (its servable, until when it stays loaded); several workers only
        self.retired: dict[tuple[str, int], tuple[DesiredModel, Servable, float]] = {}
        # (model, version) -> the servable that served it before its content was replaced
        self.previous: dict[tuple[str, int], Servable] = {}
        self._on_change = None
        self._rebuild()
        self._on_change = on_change
        self._wake = {b.name: asyncio.Event() for b in self.backends}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._started = False
        self._stopping = asyncio.Event()

    def update(self, models: Mapping[str, DesiredModel]) -> None:
        """Replace the desired models (e.g. from modelsync); routing moves as backends load them."""
        for name, model in models.items():
            old = self.models.get(name)
            if old is None:
                continue
            for version, servable in model.versions.items():
                before = old.versions.get(version)
                if before is None or before == servable:
                    continue
                # Keep the content that serves: a second rewrite while the first is still
                # loading (or failed) must not displace the servable routing still uses.
                serving = any(b.available(before, version) for b in self.backends)
                if (name, version) not in self.previous or serving:
                    self.previous[(name, version)] = old.servables[before]
        self.previous = {
            key: old
            for key, old in self.previous.items()
            if key[0] in models and key[1] in models[key[0]].versions
        }
        if self.hold:
            self._retire(models)
        self.models = dict(models)
        self._rebuild()
        for event in self._wake.values():
            event.set()

    def set_problems(self, problems: Problems) -> None:
        """What modelsync refuses and which sources fail, for the models' states."""
        self.problems = problems
        self._rebuild()

    def _retire(self, models: Mapping[str, DesiredModel]) -> None:
        """With several workers, a removed version stays loaded for ``hold`` seconds, so that a
        worker whose modelsync stream lags routes away from it before it is unloaded."""
        until = time.monotonic() + self.hold
        for name, old in self.models.items():
            for version, servable in old.versions.items():
                if version not in (models[name].versions if name in models else {}):
                    self.retired[(name, version)] = (old, old.servables[servable], until)

    def states(self, name: str) -> dict[int, list[tuple[Backend, VersionStatus]]]:
        """Each version of a model and its state on every backend it is placed on."""
        model = self.models[name]
        out: dict[int, list[tuple[Backend, VersionStatus]]] = {}
        for version, current in sorted(model.versions.items()):
            old = self.previous.get((name, version))
            entries = []
            for backend in self.backends:
                if not model.placed_on(backend.config):
                    continue
                status = backend.status.get(current, {}).get(version)
                if old is not None and (status is None or status.state != AVAILABLE):
                    status = backend.status.get(old.name, {}).get(version) or status
                if status is not None:
                    entries.append((backend, status))
            out[version] = entries
        return out

    def placed(self, backend: Backend) -> list[DesiredModel]:
        return [m for m in self.models.values() if m.placed_on(backend.config)]

    def wanted(self, backend: Backend) -> list[Servable]:
        """Every servable this backend should hold, old content included until its successor
        settled; a version that failed to load is left out until its retry is due (leaving it
        out and putting it back is what makes TF Serving try again)."""
        entries: dict[str, tuple[str, set[int]]] = {}
        now = time.monotonic()

        def add(servable: Servable, versions: tuple[int, ...]) -> None:
            due = {
                v for v in versions if backend.failures.get((servable.name, v), (0, 0.0))[1] <= now
            }
            if due:
                entries.setdefault(servable.name, (servable.base_path, set()))[1].update(due)

        self.retired = {k: r for k, r in self.retired.items() if r[2] > now}
        for (name, version), (gone, retiring, _) in self.retired.items():
            still = self.models.get(name)
            if gone.placed_on(backend.config) and (still is None or version not in still.versions):
                add(retiring, (version,))
        for model in self.placed(backend):
            for servable in model.servables.values():
                add(servable, servable.versions)
            for version, current in model.versions.items():
                old = self.previous.get((model.name, version))
                if (
                    old is not None
                    and not self._settled(backend, current, version)
                    and backend.available(old.name, version)
                ):
                    add(old, (version,))
        return [Servable(name, base, tuple(sorted(vs))) for name, (base, vs) in entries.items()]

    def start(self) -> None:
        self._started = True
        for backend in self.backends:
            self._start(backend)

    def _start(self, backend: Backend) -> None:
        task = asyncio.create_task(self._reconcile(backend), name=f"reconcile-{backend.name}")
        self._tasks[backend.name] = task

    def add(self, config: BackendConfig) -> None:
        """A backend appeared (discovery): it gets its full config from its own reconciler."""
        backend = Backend(config, self.config)
        self.backends.append(backend)
        self._wake[backend.name] = asyncio.Event()
        log.info("backend_added", backend=backend.name, address=backend.address)
        if self._started:
            self._start(backend)

    async def remove(self, name: str) -> None:
        """A backend went away (discovery): routing drops it before its channel closes."""
        backend = next((b for b in self.backends if b.name == name), None)
        if backend is None:
            return
        self.backends.remove(backend)
        self._rebuild()
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._wake.pop(name, None)
        await backend.close(grace=min(self.config.backend_timeout, 30.0))
        log.info("backend_removed", backend=name, address=backend.address)

    def poke(self, backend: Backend) -> None:
        """Ask a reconciler to look at its backend now (e.g. after a failed call)."""
        event = self._wake.get(backend.name)
        if event is not None:  # a backend removed by discovery has no reconciler any more
            event.set()

    async def close(self) -> None:
        self._stopping.set()
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.gather(*(b.close() for b in self.backends))

    async def _reconcile(self, backend: Backend) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            event = self._wake[backend.name]
            event.clear()
            try:
                converged = await self._round(backend)
                backoff = 0.1
                wait = self.config.status_interval if converged else CONVERGING_POLL
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and backend.reachable:
                    # busy (a long load), not gone: keep routing what it holds, ask again
                    backend.pushed = None
                    log.warning("backend_slow", backend=backend.name, error=str(exc.details()))
                else:
                    self._mark_unreachable(backend, f"{exc.code().name}: {exc.details()}")
                wait, backoff = backoff, min(backoff * 2, MAX_BACKOFF)
            except RuntimeError as exc:
                backend.last_error = str(exc)
                log.warning("backend_reload_failed", backend=backend.name, error=str(exc))
                wait, backoff = backoff, min(backoff * 2, MAX_BACKOFF)
            except Exception:  # the edge of a background task: log, back off, keep converging
                log.exception("reconcile_failed", backend=backend.name)
                wait, backoff = backoff, min(backoff * 2, MAX_BACKOFF)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), wait)

    async def _round(self, backend: Backend) -> bool:
        """Push the config if it changed, poll status; True when nothing is still loading."""
        timeout = min(self.config.backend_timeout, 10.0)
        wanted = self.wanted(backend)
        config = _config(wanted)
        pushed_now = False
        if not self.manage:
            backend.pushed = config  # the first worker owns the backends' configuration
        elif config != backend.pushed:
            pushed_now = True
            self._forget_unwanted(backend, wanted)
            # TF Serving answers a reload adding new model names only once they loaded
            await backend.reload(
                config, timeout=max(self.config.backend_timeout, self.config.load_timeout)
            )
            log.info("backend_configured", backend=backend.name, servables=[s.name for s in wanted])
        status: dict[str, dict[int, VersionStatus]] = {}
        for servable in wanted:
            reported = await backend.servable_status(servable.name, timeout)
            if reported is None and not self.manage:
                continue  # not configured (yet) by the first worker
            if reported is None:
                backend.pushed = None  # the backend lost its config (restarted): push again
                self._rebuild()  # and its calls for latest are pinned until it has it again
                return False
            status[servable.name] = reported
        if not backend.reachable:
            log.info("backend_reachable", backend=backend.name, address=backend.address)
        backend.reachable, backend.last_error = True, ""
        self._track_failures(backend, status)
        keep = {(s.name, v) for s in wanted for v in s.versions} | set(backend.failures)
        backend.available_since = {k: t for k, t in backend.available_since.items() if k in keep}
        backend.load_errors = {k: e for k, e in backend.load_errors.items() if k in keep}
        backend.retrying &= keep
        if pushed_now or status != backend.status or status != backend.reported:
            self._log_failures(backend, status)
            backend.status = backend.reported = status
            self._rebuild()
        if _config(self.wanted(backend)) != backend.pushed:
            return False
        return all(
            status.get(s.name, {}).get(v, VersionStatus(0)).state in (AVAILABLE, END)
            for s in wanted
            for v in s.versions
        )

    def _settled(self, backend: Backend, servable: str, version: int) -> bool:
        """AVAILABLE for long enough that every gateway worker routes to it by now."""
        since = backend.available_since.get((servable, version))
        return since is not None and time.monotonic() - since >= self.hold

    def _forget_unwanted(self, backend: Backend, wanted: Sequence[Servable]) -> None:
        """Routing leaves what a config push is about to unload before the push goes out."""
        keep = {(s.name, v) for s in wanted for v in s.versions}
        pruned = {
            name: {
                v: st for v, st in versions.items() if (name, v) in keep or st.state != AVAILABLE
            }
            for name, versions in backend.status.items()
        }
        if pruned != backend.status:
            backend.status = pruned
            self._rebuild()

    def _track_failures(
        self, backend: Backend, status: Mapping[str, Mapping[int, VersionStatus]]
    ) -> None:
        now = time.monotonic()
        for name, versions in status.items():
            for version, entry in versions.items():
                key = (name, version)
                if entry.state != AVAILABLE:
                    backend.available_since.pop(key, None)
                if entry.state == AVAILABLE:
                    backend.available_since.setdefault(key, now)
                    backend.failures.pop(key, None)
                    backend.load_errors.pop(key, None)
                elif entry.state != END:
                    backend.retrying.discard(key)  # the retry is under way
                elif entry.error:
                    backend.load_errors[key] = entry.error
                    attempts, retry_at = backend.failures.get(key, (0, 0.0))
                    # right after a retry was sent the old failure may still be reported
                    stale = key in backend.retrying and now < retry_at + STALE_FAILURE
                    if retry_at <= now and not stale:
                        delay = min(LOAD_RETRY * 2**attempts, MAX_LOAD_RETRY)
                        backend.failures[key] = (attempts + 1, now + delay)
                        backend.retrying.add(key)
                        log.warning(
                            "version_load_retry_scheduled",
                            backend=backend.name,
                            servable=name,
                            version=version,
                            attempt=attempts + 1,
                            seconds=delay,
                        )

    def _log_failures(
        self, backend: Backend, status: Mapping[str, Mapping[int, VersionStatus]]
    ) -> None:
        for name, versions in status.items():
            for version, entry in versions.items():
                seen = backend.status.get(name, {}).get(version)
                if entry.error and (seen is None or seen.error != entry.error):
                    log.warning(
                        "version_load_failed",
                        backend=backend.name,
                        servable=name,
                        version=version,
                        error=entry.error,
                    )

    def _mark_unreachable(self, backend: Backend, error: str) -> None:
        if backend.reachable or not backend.last_error:
            log.warning(
                "backend_unreachable", backend=backend.name, address=backend.address, error=error
            )
        backend.reachable, backend.last_error, backend.pushed = False, error, None
        if backend.status:
            backend.status = backend.reported = {}
            self._rebuild()

    def _targets(self, model: DesiredModel, version: int, current: str) -> list[Target]:
        old = self.previous.get((model.name, version))
        # Only a backend this gateway configures (specific versions), holding the config last
        # pushed, cannot load a newer version on its own; the versions it serves are those its
        # last status poll reported in any state but END (a version a push is about to unload
        # stays there until a poll after the push).
        newest = self.manage and version >= max(model.versions, default=0)
        targets = []
        for backend in self.backends:
            for servable in (current, old.name if old is not None else None):
                if servable is not None and backend.available(servable, version):
                    known = backend.reported.get(servable, {})
                    served = (v for v, st in known.items() if st.state != END)
                    top = (
                        newest and backend.pushed is not None and version >= max(served, default=0)
                    )
                    targets.append(Target(backend, servable, top))
                    break
        return targets

    def _rebuild(self) -> None:
        routes: dict[str, Route] = {}
        for name, model in self.models.items():
            versions = {}
            for version, current in model.versions.items():
                targets = self._targets(model, version, current)
                if targets:
                    versions[version] = tuple(targets)
            if versions:
                labels = self._move_labels(name, versions)
                routes[name] = Route(name, versions, labels, dict(self.splits.get(name, {})))
        self.previous = {key: old for key, old in self.previous.items() if not self._moved_on(key)}
        configured = {name: frozenset(model.versions) for name, model in self.models.items()}
        known = frozenset(self.models) | frozenset(self.expected) | frozenset(self.problems.refused)
        failed = self._failed_versions(routes)
        states = {name: self._status(name, name in routes, failed) for name in known}
        self.table = Table(
            routes=routes,
            known=known,
            configured=configured,
            states=states,
            failed_versions=failed,
        )
        if self._on_change is not None:
            self._on_change(self.table)

    def api_of(self, name: str) -> str:
        """The API a known model belongs to."""
        if name in self.models:
            return self.models[name].api
        if name in self.expected:
            return self.expected[name].api
        return self.problems.apis.get(name, "")

    def _failed_versions(self, routes: Mapping[str, Route]) -> dict[tuple[str, int], str]:
        """Versions that are not routable and will not be by waiting: refused by modelsync and not
        published, or failed to load on every reachable backend they are placed on."""
        out: dict[tuple[str, int], str] = {}
        for name, versions in self.problems.refused.items():
            published = self.models[name].versions if name in self.models else {}
            for version, reason in versions.items():
                if version is not None and version not in published:
                    out[(name, version)] = f"modelsync refused version {version}: {reason}"
        for name, model in self.models.items():
            route = routes.get(name)
            placed = self._placed_backends(name)
            for version, servable in model.versions.items():
                if placed and (route is None or version not in route.versions):
                    errors = [b.load_errors.get((servable, version)) for b in placed]
                    if all(errors):
                        out[(name, version)] = (
                            f"version {version} failed to load on {placed[0].name}: {errors[0]}"
                        )
        return out

    def _status(
        self, name: str, routed: bool, failed: Mapping[tuple[str, int], str]
    ) -> ModelStatus:
        """Whether the model can be called, and if not, why not."""
        if routed:
            return ModelStatus("AVAILABLE")
        model = self.models.get(name)
        if model is None or not model.versions:
            refused = self.problems.refused.get(name)
            if refused:
                return ModelStatus(REFUSED, refusal_text(refused))
            expected = self.expected.get(name)
            if expected is not None:
                error = self.problems.source_errors.get((expected.api, expected.uri))
                if error:
                    return ModelStatus(SOURCE_FAILING, f"its source {expected.uri} fails: {error}")
            return ModelStatus(PENDING, "modelsync has published no version of it yet")
        if not any(model.placed_on(b) for b in self.backend_configs):
            return ModelStatus(FAILED, f"no configured backend can hold it: {_placement(model)}")
        errors = [failed[(name, v)] for v in sorted(model.versions) if (name, v) in failed]
        if len(errors) == len(model.versions):
            return ModelStatus(FAILED, errors[-1])
        placed = [b for b in self.backends if model.placed_on(b.config)]
        reachable = [b.name for b in placed if b.reachable]
        loading = [str(v) for v in sorted(model.versions) if (name, v) not in failed]
        if reachable:
            what = f"version{'s' if len(loading) > 1 else ''} {', '.join(loading)}"
            return ModelStatus(LOADING, f"{what} loading on {', '.join(reachable)}")
        if not placed:
            return ModelStatus(LOADING, "waiting for its backends to be discovered")
        down = "; ".join(f"{b.name} ({b.last_error or 'not reached yet'})" for b in placed)
        return ModelStatus(LOADING, f"no backend that can hold it is reachable: {down}")

    def _move_labels(self, name: str, versions: Mapping[int, Sequence[Target]]) -> dict[str, int]:
        effective = self.effective.setdefault(name, {})
        reachable = {b.name for b in self._placed_backends(name)}
        for label, version in self.labels.get(name, {}).items():
            holders = {t.backend.name for t in versions.get(version, ())}
            if label not in effective or (holders and reachable <= holders):
                if effective.get(label) != version:
                    log.info("label_moved", model=name, label=label, version=version)
                effective[label] = version
        for label in [lb for lb in effective if lb not in self.labels.get(name, {})]:
            del effective[label]
        return dict(effective)

    def set_label(self, model: str, label: str, version: int) -> None:
        """Ask a label to point at ``version`` (0 deletes it); it moves when the version is ready."""
        labels = self.labels.setdefault(model, {})
        if version:
            labels[label] = version
        else:
            labels.pop(label, None)
        self._rebuild()

    def set_split(self, model: str, weights: Mapping[int, int]) -> None:
        if weights:
            self.splits[model] = dict(weights)
        else:
            self.splits.pop(model, None)
        self._rebuild()

    def _moved_on(self, key: tuple[str, int]) -> bool:
        """Every reachable backend holding the model has settled on the version's new content."""
        placed = self._placed_backends(key[0])
        current = self.models[key[0]].versions[key[1]]
        return bool(placed) and all(self._settled(b, current, key[1]) for b in placed)

    def _placed_backends(self, model: str) -> list[Backend]:
        desired = self.models[model]
        return [b for b in self.backends if desired.placed_on(b.config) and b.reachable]


def _placement(model: DesiredModel) -> str:
    if model.inferentia:
        return (
            f"API {model.api!r} runs on Inferentia (compute.inf > 0) and no backend has "
            "accelerator: inferentia"
        )
    if model.gpu_only:
        return (
            f"API {model.api!r} asks for GPUs (compute.gpu > 0) and no backend has accelerator: gpu"
        )
    return "no backend has accelerator: cpu or gpu"
