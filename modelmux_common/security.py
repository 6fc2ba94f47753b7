"""TLS credentials from the PEM files the config names, re-read when the files change, and the
bearer tokens of ``gateway.auth`` (docs/security.md).

A server's certificate is gRPC's dynamic kind: before every new connection's handshake gRPC asks
:class:`ServerCertificates` for a replacement, which compares the files' identity, size and mtime
with what it last loaded (a ``stat`` per connection, no read), and only when they changed reads
them, checks that the key matches the certificate, and hands gRPC the new pair. A pair that does
not load (a renewal half written, a key for another certificate) is logged once and the current
one kept. Connections already open keep the certificate of their handshake.

A client's credentials cannot be swapped inside a gRPC channel: :class:`ClientCertificates` tells
its owner when the files changed, and the owner opens a new channel.
"""

from __future__ import annotations

import os
import re
import ssl
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc
import structlog

if TYPE_CHECKING:
    from modelmux_common.config.schema import ClientTls, ServerTls, TokenSpec

log = structlog.get_logger("modelmux.security")

_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
_PRIVATE_KEY = re.compile(rb"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")
# RFC 6750's b64token: what may follow "Bearer "
_TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*\Z")
Stamp = tuple[tuple[int, int, int], ...]


class TlsError(ValueError):
    """A certificate, key or CA file that cannot be used; the message names the file."""


def stamp(paths: tuple[str, ...]) -> Stamp:
    """What tells a file changed without reading it: inode (a swapped symlink, a rename over it),
    size and mtime. Raises OSError for a file that is missing."""
    out = []
    for path in paths:
        st = os.stat(path)
        out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def check_certificate(cert: str, key: str) -> None:
    """Raises :class:`TlsError` unless ``cert`` holds PEM certificates and ``key`` its key."""
    if _CERTIFICATE not in _read(cert):
        raise TlsError(f"{cert} holds no PEM certificate")
    if not _PRIVATE_KEY.search(_read(key)):
        raise TlsError(f"{key} holds no PEM private key")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise TlsError(f"{key} is not the private key of the certificate in {cert}") from None
        raise TlsError(f"{cert} and {key} do not load: {exc.reason or exc}") from None


def check_ca(path: str) -> None:
    """Raises :class:`TlsError` unless ``path`` holds PEM CA certificates."""
    if _CERTIFICATE not in _read(path):
        raise TlsError(f"{path} holds no PEM certificate")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise TlsError(f"{path} does not load as CA certificates: {exc.reason or exc}") from None


def _server_paths(spec: ServerTls) -> tuple[str, ...]:
    return (spec.cert, spec.key, spec.client_ca) if spec.client_ca else (spec.cert, spec.key)


class ServerCertificates:
    """A server's certificate (and client CA), served by gRPC and re-read when the files change.

    ``what`` names the server in the log lines (``gateway``, ``modelsync``, ``backend``)."""

    def __init__(self, spec: ServerTls, *, what: str) -> None:
        self.spec = spec
        self.what = what
        self._paths = _server_paths(spec)
        self._lock = threading.Lock()
        self._stamp = stamp(self._paths)
        self._files = self._load()
        self.reloads = 0  # certificate changes served since start

    def _load(self) -> tuple[bytes, ...]:
        """The files' contents once they form a usable set (TlsError or OSError otherwise)."""
        files = tuple(_read(p) for p in self._paths)
        check_certificate(self.spec.cert, self.spec.key)
        if self.spec.client_ca:
            check_ca(self.spec.client_ca)
        if tuple(_read(p) for p in self._paths) != files:
            raise OSError("the files changed while they were checked")
        return files

    def _configuration(self, files: tuple[bytes, ...]) -> grpc.ServerCertificateConfiguration:
        cert, key, *ca = files
        return grpc.ssl_server_certificate_configuration(
            [(key, cert)], root_certificates=ca[0] if ca else None
        )

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._configuration(self._files),
            self.fetch,  # type: ignore[arg-type]  # None keeps the current one (grpc's docs)
            require_client_authentication=bool(self.spec.client_ca),
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's question before each handshake (on its own threads): a new configuration when
        the files changed and load, None to keep the current one."""
        try:
            now = stamp(self._paths)
        except OSError:
            return None  # a file is being replaced: ask again on the next connection
        with self._lock:
            if now == self._stamp:
                return None
            try:
                files = self._load()
            except OSError:
                return None  # still changing: not recorded, so the next connection retries
            except TlsError as exc:
                self._stamp = now  # logged once per change of the files
                log.warning("tls_reload_failed", server=self.what, error=str(exc))
                return None
            self._stamp = now
            if files == self._files:
                return None  # touched, not changed
            self._files = files
            self.reloads += 1
        log.info("tls_reloaded", server=self.what, cert=self.spec.cert)
        return self._configuration(files)


def server_credentials(spec: ServerTls | None, *, what: str) -> grpc.ServerCredentials | None:
    """The credentials of a server listening with ``spec`` (None: plaintext)."""
    return None if spec is None else ServerCertificates(spec, what=what).credentials()


def _client_paths(spec: ClientTls) -> tuple[str, ...]:
    return tuple(p for p in (spec.ca, spec.cert, spec.key) if p)


class ClientCertificates:
    """A client's TLS files as channel credentials and options; ``changed()`` says (with a
    ``stat`` of each file) that the files are no longer those the last ``credentials()`` read."""

    def __init__(self, spec: ClientTls) -> None:
        self.spec = spec
        self._paths = _client_paths(spec)
        self._stamp: Stamp = ()

    def credentials(self) -> grpc.ChannelCredentials:
        spec = self.spec
        self._stamp = stamp(self._paths)
        return grpc.ssl_channel_credentials(
            root_certificates=_read(spec.ca) if spec.ca else None,
            private_key=_read(spec.key) if spec.key else None,
            certificate_chain=_read(spec.cert) if spec.cert else None,
        )

    def options(self) -> list[tuple[str, str]]:
        name = self.spec.server_name
        return [("grpc.ssl_target_name_override", name)] if name else []

    def changed(self) -> bool:
        try:
            return stamp(self._paths) != self._stamp
        except OSError:
            return False  # being replaced: the next check sees the new files


def aio_channel(
    address: str, tls: ClientCertificates | None, options: Sequence[tuple[str, Any]]
) -> grpc.aio.Channel:
    """A grpc.aio channel to ``address``: plaintext without ``tls``."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=list(options))
    return grpc.aio.secure_channel(address, tls.credentials(), options=[*options, *tls.options()])


def read_tokens(spec: TokenSpec) -> tuple[bytes, ...]:
    """The tokens of one API (ValueError naming where they are, never a token)."""
    if spec.file:
        try:
            with open(spec.file, encoding="utf-8") as fh:
                lines = fh.read().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read {spec.file}: {exc}") from None
        where = spec.file
    else:
        value = os.environ.get(spec.env, "")
        lines = [value]
        where = f"${spec.env}"
    tokens = [line.strip() for line in lines if line.strip()]
    if not tokens:
        raise ValueError(f"{where} holds no token")
    for number, token in enumerate(tokens, 1):
        if not _TOKEN.match(token):
            raise ValueError(
                f"{where}: token {number} is not a bearer token (letters, digits, -._~+/ "
                "and trailing =)"
            )
    return tuple(t.encode() for t in tokens)
