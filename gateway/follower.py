"""Follows modelsync's event stream and turns what is published into the desired models.

The stream starts with a snapshot (or replays the events after the last revision seen, on a
reconnect), then carries live events. The follower keeps the published state, rebuilds the
catalogue from it after every change, and hands it to the fleet. While modelsync is unreachable the
last catalogue stays in force and the follower reconnects with backoff. Models of the APIs in
``skip_apis`` (python handlers, whose versions are not SavedModels) never enter the catalogue.

Revisions are those of one modelsync instance: every message names the instance that sent it, a
resume says which instance its revision is from, and messages from another one (a restarted
modelsync, or another stack at the same address) make the follower start again from a snapshot.
What modelsync refuses, and sources that fail, are kept too and handed over as
:class:`~gateway.catalog.Problems`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import grpc
import structlog

from gateway.catalog import DesiredModel, Problems, Servable
from gateway.metrics import RELOADS
from modelmux.modelsync.v1 import modelsync_pb2, modelsync_pb2_grpc
from modelmux_common.config import ClientTls
from modelmux_common.security import ClientCertificates, aio_channel

log = structlog.get_logger("modelmux.gateway")

K = modelsync_pb2
_PUBLISHING = (
    K.EVENT_KIND_VERSION_ADDED,
    K.EVENT_KIND_STRUCTURE_CHANGED,
    K.EVENT_KIND_CONTENT_UPDATED,
)
MAX_BACKOFF = 5.0


class _OtherInstance(Exception):
    """A resumed stream carries events of another modelsync instance: subscribe again, afresh."""


@dataclass
class _Model:
    api: str
    inferentia: bool
    # modelsync's view folder <target>/<model>, whose <version> entries point at current content
    view: str
    # version -> store base path of its current content
    versions: dict[int, str] = field(default_factory=dict)


def view_of(model: str, store_base_path: str) -> str:
    """``<target>/<model>`` from ``<target>/.store/<model>/r<revision>`` (modelsync's layout)."""
    target = os.path.dirname(os.path.dirname(os.path.dirname(store_base_path.rstrip("/"))))
    return os.path.join(target, model)


def _kind_name(kind: int) -> str:
    """The event kind's name; a kind from a newer modelsync is shown by number, not fatal."""
    try:
        return str(modelsync_pb2.EventKind.Name(kind))  # type: ignore[arg-type]
    except ValueError:
        return f"EVENT_KIND_{kind}"


def servable_name(model: str, store_base_path: str) -> str:
    """``<model>@r<revision>``: the store folder's name identifies the published content."""
    return f"{model}@{os.path.basename(store_base_path.rstrip('/'))}"


class Follower:
    """Keeps a catalogue in step with modelsync."""

    def __init__(
        self,
        address: str,
        on_catalog: Callable[[Mapping[str, DesiredModel]], None],
        *,
        gpu_apis: frozenset[str] = frozenset(),
        skip_apis: frozenset[str] = frozenset(),
        on_problems: Callable[[Problems], None] | None = None,
        tls: ClientTls | None = None,
    ) -> None:
        self.address = address
        # over TLS: the files are checked at each subscription, and a change opens a new channel
        self._tls = ClientCertificates(tls) if tls is not None else None
        self.gpu_apis = gpu_apis
        # APIs whose models the backends never load (python handlers): left out of the catalogue
        self.skip_apis = skip_apis
        self.on_catalog = on_catalog
        self.on_problems = on_problems
        self.revision = 0
        # the modelsync instance self.revision belongs to ("" before the first message)
        self.instance = ""
        self.connected = False
        self.synced = asyncio.Event()  # set once the first snapshot arrived
        self.on_connection: Callable[[bool], None] | None = None
        self._models: dict[str, _Model] = {}
        # (model, version) -> store base path of the content first seen: while a version keeps it,
        # it is served from the view under the model's own name (no renaming on the request path)
        self._first: dict[tuple[str, int], str] = {}
        # (model, version or None, reason) -> API: what modelsync refuses now
        self._refused: dict[tuple[str, int | None, str], str] = {}
        # (api, source uri) -> error, while the source fails
        self._source_errors: dict[tuple[str, str], str] = {}
        self._problems_changed = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="modelsync-follower")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def store_paths(self, api: str) -> dict[str, dict[int, str]]:
        """An API's models: version -> its current content's immutable store folder."""
        return {
            name: {v: os.path.join(base, str(v)) for v, base in model.versions.items()}
            for name, model in self._models.items()
            if model.api == api and model.versions
        }

    def problems(self) -> Problems:
        """What modelsync refuses (by model and version) and which sources fail, without the
        APIs in ``skip_apis``."""
        refused: dict[str, dict[int | None, str]] = {}
        apis: dict[str, str] = {}
        for (model, version, reason), api in sorted(self._refused.items(), key=_refusal_order):
            if not model or api in self.skip_apis:
                continue
            per = refused.setdefault(model, {})
            per[version] = f"{per[version]}; {reason}" if version in per else reason
            apis[model] = api
        errors = {k: e for k, e in self._source_errors.items() if k[0] not in self.skip_apis}
        return Problems(refused, apis, errors)

    def catalog(self) -> dict[str, DesiredModel]:
        """Versions still holding the content first seen are one servable named after the model,
        loaded from the view; a version whose content changed since is its own servable
        ``<model>@r<revision>`` from the immutable store, so it can load beside the old one."""
        out = {}
        for name, model in self._models.items():
            if not model.versions or model.api in self.skip_apis:
                continue
            versions: dict[int, str] = {}
            servables: dict[str, Servable] = {}
            for v, base in sorted(model.versions.items()):
                if self._first.get((name, v)) == base:
                    versions[v] = name
                else:
                    versions[v] = servable_name(name, base)
                    servables[versions[v]] = Servable(versions[v], base, (v,))
            plain = tuple(v for v, s in versions.items() if s == name)
            if plain:
                servables[name] = Servable(name, model.view, plain)
            gpu_only = model.api in self.gpu_apis
            out[name] = DesiredModel(
                name, model.api, model.inferentia, versions, servables, gpu_only
            )
        return out

    async def _run(self) -> None:
        backoff = 0.2
        options = [
            ("grpc.max_receive_message_length", 256 * 1024 * 1024),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", int(MAX_BACKOFF * 1000)),
        ]
        channel = aio_channel(self.address, self._tls, options)
        try:
            while True:
                if self._tls is not None and self._tls.changed():
                    await channel.close()
                    channel = aio_channel(self.address, self._tls, options)
                stub = modelsync_pb2_grpc.ModelSyncStub(channel)
                try:
                    request = modelsync_pb2.WatchEventsRequest(
                        from_revision=self.revision, instance=self.instance
                    )
                    stream = stub.WatchEvents(request, wait_for_ready=True)
                    # A resume at the current revision gets no message until the next event:
                    # being connected is the channel being READY with the stream open.
                    await asyncio.wait_for(channel.channel_ready(), MAX_BACKOFF)
                    self._set_connected(True)
                    backoff = 0.2
                    async for item in stream:
                        self._apply(item)
                    error = "stream ended"
                except _OtherInstance:
                    stream.cancel()
                    continue  # at once, from revision 0: the new instance sends a snapshot
                except grpc.aio.AioRpcError as exc:
                    error = f"{exc.code().name}: {exc.details()}"
                except TimeoutError:
                    stream.cancel()
                    error = "modelsync unreachable"
                except Exception as exc:  # the edge of a background task: resubscribe, keep going
                    log.exception("modelsync_follow_failed")
                    error = f"{type(exc).__name__}: {exc}"
                self._set_connected(False, error)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
        finally:
            await channel.close()

    def _set_connected(self, connected: bool, error: str = "") -> None:
        if connected == self.connected:
            return
        self.connected = connected
        if connected:
            log.info("modelsync_connected", address=self.address, from_revision=self.revision)
        else:
            log.warning(
                "modelsync_disconnected", address=self.address, error=error, revision=self.revision
            )
        if self.on_connection is not None:
            self.on_connection(connected)

    def _apply(self, item: modelsync_pb2.WatchEventsResponse) -> None:
        if item.HasField("snapshot"):
            if self.instance and item.instance != self.instance:
                log.info(
                    "modelsync_instance_changed",
                    address=self.address,
                    previous=self.instance,
                    instance=item.instance,
                )
            self.instance = item.instance
            self._snapshot(item.snapshot)
            changed = True
        else:
            if item.instance and self.instance and item.instance != self.instance:
                # revisions of another history: what this follower knows may be stale
                log.warning(
                    "modelsync_instance_changed",
                    address=self.address,
                    previous=self.instance,
                    instance=item.instance,
                    action="subscribing again from a snapshot",
                )
                self.revision, self.instance = 0, ""
                raise _OtherInstance
            self.instance = self.instance or item.instance
            event = item.event
            self.revision = max(self.revision, event.revision)
            changed = self._event(event)
        # the catalogue first: were the refusals of a snapshot applied before the models it
        # publishes, a moment with only refused models known would look settled to start-up
        if changed:
            self.on_catalog(self.catalog())
        if self._problems_changed:
            self._problems_changed = False
            if self.on_problems is not None:
                self.on_problems(self.problems())

    def _snapshot(self, snapshot: modelsync_pb2.Snapshot) -> None:
        self._models = {}
        for published in snapshot.models:
            model = _Model(published.api, published.inferentia, published.base_path)
            self._models[published.name] = model
            for v in published.versions:
                model.versions[v.version] = v.store_base_path
                self._first.setdefault((published.name, v.version), v.store_base_path)
        self._first = {
            key: base
            for key, base in self._first.items()
            if key[0] in self._models and key[1] in self._models[key[0]].versions
        }
        self._refused = {
            (r.model, r.version if r.HasField("version") else None, r.reason): r.api
            for r in snapshot.refused
        }
        self._source_errors = {
            (s.api, s.uri): s.error for s in snapshot.sources if not s.healthy and s.error
        }
        self._problems_changed = True
        self.revision = snapshot.revision
        log.info(
            "modelsync_snapshot",
            revision=snapshot.revision,
            reason=int(snapshot.reason),
            models=sorted(self._models),
            refused=sorted({r.model for r in snapshot.refused if r.model}),
        )
        self.synced.set()

    def _event(self, event: modelsync_pb2.Event) -> bool:
        """Applies one event; True when the catalogue changed."""
        kind = event.kind
        model: _Model | None
        if kind in _PUBLISHING and event.HasField("version"):
            view = view_of(event.model, event.store_base_path)
            model = self._models.setdefault(event.model, _Model(event.api, event.inferentia, view))
            model.versions[event.version] = event.store_base_path
            self._first.setdefault((event.model, event.version), event.store_base_path)
            if model.api not in self.skip_apis:  # (python APIs' models are never routed)
                self._time_reload(event)
        elif kind == K.EVENT_KIND_VERSION_REMOVED and event.HasField("version"):
            RELOADS.event(_kind_name(kind))
            RELOADS.forget(event.model, event.version)
            model = self._models.get(event.model)
            if model is None or model.versions.pop(event.version, None) is None:
                return False
            self._first.pop((event.model, event.version), None)
        elif kind == K.EVENT_KIND_MODEL_REMOVED:
            RELOADS.event(_kind_name(kind))
            RELOADS.forget(event.model)
            model = self._models.pop(event.model, None)
            if model is None:
                return False
            self._first = {k: b for k, b in self._first.items() if k[0] != event.model}
        else:
            RELOADS.event(_kind_name(kind))
            self._note(event)
            log.info(
                "modelsync_event",
                kind=_kind_name(kind),
                model=event.model,
                reason=event.reason,
                revision=event.revision,
            )
            return False
        log.info(
            "model_published" if kind in _PUBLISHING else "model_withdrawn",
            kind=_kind_name(kind),
            model=event.model,
            version=event.version if event.HasField("version") else None,
            revision=event.revision,
        )
        return model.api not in self.skip_apis

    def _time_reload(self, event: modelsync_pb2.Event) -> None:
        """Starts the event-to-routable clock of the servable the catalogue will name."""
        base = event.store_base_path
        first = self._first.get((event.model, event.version)) == base
        servable = event.model if first else servable_name(event.model, base)
        RELOADS.event(
            _kind_name(event.kind), model=event.model, version=event.version, servable=servable
        )

    def _note(self, event: modelsync_pb2.Event) -> None:
        """Keeps what modelsync refuses and which sources fail."""
        version = event.version if event.HasField("version") else None
        refusal = (event.model, version, event.reason)
        source = (event.api, event.source)
        if event.kind == K.EVENT_KIND_VALIDATION_FAILED:
            self._refused[refusal] = event.api
        elif event.kind == K.EVENT_KIND_VALIDATION_CLEARED:
            if self._refused.pop(refusal, None) is None:
                return
        elif event.kind == K.EVENT_KIND_SOURCE_ERROR:
            self._source_errors[source] = event.reason
        elif event.kind == K.EVENT_KIND_SOURCE_RECOVERED:
            if self._source_errors.pop(source, None) is None:
                return
        else:
            return
        self._problems_changed = True


def _refusal_order(item: tuple[tuple[str, int | None, str], str]) -> tuple[str, int, str]:
    (model, version, reason), _ = item
    return (model, -1 if version is None else version, reason)
