"""What a client is built from: the target, deadlines, retries, TLS and channel options.

Retries are gRPC's own (the service config's ``retryPolicy``, gRFC A6): an attempt that fails
with a retryable status before the gateway sent anything back is sent again after an exponential
backoff with jitter, within the call's deadline, on any of the channel's connections. gRPC's C
core caps ``max_attempts`` at 5 and jitters each wait by +-20%, so the default policy below waits
about 0.2 + 0.4 + 0.8 + 1.6 s: long enough to ride out a gateway restart or a model that is still
loading, short enough to fail well inside the default 30 s deadline. ``retryThrottling`` stops
retrying when most recent calls failed, so a down gateway does not get five times the load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

ChannelOption = tuple[str, Any]

DEFAULT_TARGET = "127.0.0.1:8500"
# The gateway's own default ceilings: backend_timeout 30 s, max_message_bytes 64 MiB.
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# gRPC's C core ignores attempts past this many (it logs "clamped").
MAX_ATTEMPTS = 5
# modelmux.v1.Async is safe to retry: the client gives every Submit an id (the idempotency key)
_SERVICES = (
    "modelmux.v1.Inference",
    "modelmux.v1.Models",
    "modelmux.v1.Async",
    "grpc.health.v1.Health",
)


def _seconds(value: float) -> str:
    return f"{value:.3f}s"


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """gRPC's retry policy for every modelmux call: attempts, backoff and which statuses."""

    max_attempts: int = 5
    initial_backoff: float = 0.2
    max_backoff: float = 2.0
    backoff_multiplier: float = 2.0
    # UNAVAILABLE is what the gateway answers when it is starting, stopping or waiting for a
    # model to load, and what the channel gives when no gateway is reachable.
    status_codes: tuple[grpc.StatusCode, ...] = (grpc.StatusCode.UNAVAILABLE,)
    # retryThrottling: retries stop while the token count is at or under half of max_tokens
    # (every failure takes 1 token, every success gives back token_ratio).
    max_tokens: int = 10
    token_ratio: float = 0.1

    def __post_init__(self) -> None:
        if not 2 <= self.max_attempts <= MAX_ATTEMPTS:
            raise ValueError(
                f"max_attempts must be 2..{MAX_ATTEMPTS} (gRPC caps it at {MAX_ATTEMPTS}); "
                "pass retry=None for no retries"
            )
        if self.initial_backoff <= 0 or self.max_backoff < self.initial_backoff:
            raise ValueError("need 0 < initial_backoff <= max_backoff")
        if self.backoff_multiplier < 1:
            raise ValueError("backoff_multiplier must be at least 1")
        if not self.status_codes or grpc.StatusCode.OK in self.status_codes:
            raise ValueError("status_codes must name failure statuses")

    def service_config(self) -> dict[str, Any]:
        policy = {
            "maxAttempts": self.max_attempts,
            "initialBackoff": _seconds(self.initial_backoff),
            "maxBackoff": _seconds(self.max_backoff),
            "backoffMultiplier": self.backoff_multiplier,
            "retryableStatusCodes": [code.name for code in self.status_codes],
        }
        return {
            "methodConfig": [{"name": [{"service": s} for s in _SERVICES], "retryPolicy": policy}],
            "retryThrottling": {"maxTokens": self.max_tokens, "tokenRatio": self.token_ratio},
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Tls:
    """TLS to the gateway: PEM bytes; no root certificates means gRPC's default roots.

    ``certificate_chain`` and ``private_key`` (both or neither) authenticate the client to a
    server that asks for a client certificate. ``server_name`` overrides the name checked
    against the server's certificate (e.g. when dialling an IP address).
    """

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("certificate_chain and private_key go together")

    @classmethod
    def from_files(
        cls,
        *,
        root_certificates: str | Path | None = None,
        certificate_chain: str | Path | None = None,
        private_key: str | Path | None = None,
        server_name: str | None = None,
    ) -> Tls:
        """The same, read from PEM files."""

        def read(path: str | Path | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return cls(
            root_certificates=read(root_certificates),
            certificate_chain=read(certificate_chain),
            private_key=read(private_key),
            server_name=server_name,
        )

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything a client face needs to open its channels; shared by the sync and async face."""

    target: str = DEFAULT_TARGET
    timeout: float | None = DEFAULT_TIMEOUT
    retry: RetryPolicy | None = field(default_factory=RetryPolicy)
    tls: Tls | None = None
    channels: int = 1
    wait_for_ready: bool = False
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    metadata: tuple[tuple[str, str], ...] = ()
    options: tuple[ChannelOption, ...] = ()

    def __post_init__(self) -> None:
        if self.channels < 1:
            raise ValueError("channels must be at least 1")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError("timeout must be positive (or None for no deadline)")

    def channel_options(self) -> list[ChannelOption]:
        """gRPC channel arguments; ``options`` given by the caller win over these."""
        merged: dict[str, Any] = {
            "grpc.max_receive_message_length": self.max_message_bytes,
            "grpc.max_send_message_length": self.max_message_bytes,
            # Reconnect soon after a gateway restart (gRPC's default waits 1 s, up to 120 s).
            "grpc.initial_reconnect_backoff_ms": 200,
            "grpc.max_reconnect_backoff_ms": 5000,
        }
        if self.retry is None:
            merged["grpc.enable_retries"] = 0
        else:
            merged["grpc.enable_retries"] = 1
            merged["grpc.service_config"] = json.dumps(self.retry.service_config())
        if self.channels > 1:
            # Each channel gets its own connection, so the kernel can hand them to different
            # gateway workers sharing the port (SO_REUSEPORT balances connections, not calls).
            merged["grpc.use_local_subchannel_pool"] = 1
        if self.tls is not None and self.tls.server_name:
            merged["grpc.ssl_target_name_override"] = self.tls.server_name
        merged.update(dict(self.options))
        return list(merged.items())

    def call_timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout
