"""What one backend's reconciler knows about its backend, as an immutable snapshot: the input the
table builder reads, so that nothing but the reconciler ever writes a backend's state."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.routing import Endpoint
from gateway.transport import AVAILABLE, VersionStatus
from modelmux_common.config import BackendConfig

# servable -> version -> status
Statuses = Mapping[str, Mapping[int, VersionStatus]]


@dataclass(frozen=True, slots=True)
class Report:
    config: BackendConfig
    endpoint: Endpoint
    reachable: bool = False
    last_error: str = ""
    # what routing may use: the last poll, less what a push under way is about to unload
    status: Statuses = field(default_factory=dict)
    # what the last status poll returned, never pruned ahead of a push (see table._targets)
    reported: Statuses = field(default_factory=dict)
    # the backend holds the config last pushed (False: a push is due: restarted, unreachable)
    pushed: bool = False
    # (servable, version) -> the last load error reported, until it is AVAILABLE
    load_errors: Mapping[tuple[str, int], str] = field(default_factory=dict)
    # (servable, version) -> monotonic time it was first seen AVAILABLE
    available_since: Mapping[tuple[str, int], float] = field(default_factory=dict)
    # (servable, version) that failed to load -> monotonic time of its next load attempt
    retry_at: Mapping[tuple[str, int], float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.config.name

    def available(self, servable: str, version: int) -> bool:
        status = self.status.get(servable, {}).get(version)
        return status is not None and status.state == AVAILABLE

    def settled(self, servable: str, version: int, *, now: float, hold: float) -> bool:
        """AVAILABLE for long enough (``hold``) that every gateway worker routes to it by now."""
        since = self.available_since.get((servable, version))
        return since is not None and now - since >= hold
