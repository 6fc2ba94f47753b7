"""modelmux.client's transport against small grpc.aio servers of the tests' own: retries with
backoff, deadlines, metadata, TLS and mutual TLS (certificates from trustme), and the probe."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import trustme
from conftest import ROOT
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from modelmux.client import (
    AsyncClient,
    Client,
    DeadlineExceededError,
    InvalidArgumentError,
    RetryPolicy,
    Tls,
    UnavailableError,
)
from modelmux.client.options import Settings
from modelmux.v1 import inference_pb2, inference_pb2_grpc


@dataclass
class Attempt:
    at: float
    time_remaining: float | None
    metadata: dict[str, str]


@dataclass
class Scripted(inference_pb2_grpc.InferenceServicer):
    """Predict fails with the scripted statuses in turn, then echoes the inputs as version 7."""

    failures: list[grpc.StatusCode] = field(default_factory=list)
    hang: bool = False
    attempts: list[Attempt] = field(default_factory=list)

    async def Predict(
        self, request: inference_pb2.PredictRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> inference_pb2.PredictResponse:
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        self.attempts.append(Attempt(time.monotonic(), context.time_remaining(), metadata))
        if self.hang:
            await asyncio.Event().wait()  # until the client's deadline cancels the call
        if self.failures:
            await context.abort(self.failures.pop(0), "scripted failure")
        return inference_pb2.PredictResponse(model=request.model, version=7, outputs=request.inputs)


@dataclass
class Server:
    servicer: Scripted
    port: int
    server: grpc.aio.Server

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def serve(servicer: Scripted) -> grpc.aio.Server:
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    return server


@pytest.fixture
async def make_server() -> AsyncIterator[Callable[..., Any]]:
    servers: list[grpc.aio.Server] = []

    async def make(
        servicer: Scripted | None = None, credentials: grpc.ServerCredentials | None = None
    ) -> Server:
        servicer = servicer or Scripted()
        server = serve(servicer)
        if credentials is None:
            port = server.add_insecure_port("127.0.0.1:0")
        else:
            port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        servers.append(server)
        return Server(servicer, port, server)

    yield make
    for server in servers:
        await server.stop(0)


X = {"x": np.array([1.0, 2.0], dtype=np.float32)}


# ---- retries ------------------------------------------------------------------------------------


async def test_unavailable_is_retried_until_it_answers(make_server: Callable[..., Any]) -> None:
    srv = await make_server(Scripted(failures=[grpc.StatusCode.UNAVAILABLE] * 2))
    async with AsyncClient(srv.address) as client:
        result = await client.predict("m", X)
    assert result.version == 7 and result["x"].tolist() == [1.0, 2.0]
    attempts = srv.servicer.attempts
    assert len(attempts) == 3
    assert [a.metadata.get("grpc-previous-rpc-attempts") for a in attempts] == [None, "1", "2"]


async def test_backoff_grows_between_attempts(make_server: Callable[..., Any]) -> None:
    srv = await make_server(Scripted(failures=[grpc.StatusCode.UNAVAILABLE] * 10))
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, backoff_multiplier=2.0)
    async with AsyncClient(srv.address, retry=policy) as client:
        with pytest.raises(UnavailableError, match="scripted failure"):
            await client.predict("m", X)
    times = [a.at for a in srv.servicer.attempts]
    assert len(times) == 5  # max_attempts
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # 0.1, 0.2, 0.4, 0.8 s, each +-20%: every gap at least 1.33 x the one before
    for expected, gap in zip([0.1, 0.2, 0.4, 0.8], gaps, strict=True):
        assert 0.75 * expected <= gap <= 1.25 * expected + 0.1, gaps
    assert all(b > 1.2 * a for a, b in itertools.pairwise(gaps)), gaps


async def test_no_retries_when_disabled_or_for_other_statuses(
    make_server: Callable[..., Any],
) -> None:
    srv = await make_server(Scripted(failures=[grpc.StatusCode.UNAVAILABLE]))
    async with AsyncClient(srv.address, retry=None) as client:
        with pytest.raises(UnavailableError):
            await client.predict("m", X)
    assert len(srv.servicer.attempts) == 1
    srv = await make_server(Scripted(failures=[grpc.StatusCode.INVALID_ARGUMENT]))
    async with AsyncClient(srv.address) as client:
        with pytest.raises(InvalidArgumentError):
            await client.predict("m", X)
    assert len(srv.servicer.attempts) == 1


def test_retry_policy_is_validated() -> None:
    with pytest.raises(ValueError, match="caps it at 5"):
        RetryPolicy(max_attempts=6)
    with pytest.raises(ValueError, match="initial_backoff"):
        RetryPolicy(initial_backoff=2.0, max_backoff=1.0)
    config = RetryPolicy().service_config()
    policy = config["methodConfig"][0]["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"] and policy["maxAttempts"] == 5
    assert {"service": "modelmux.v1.Inference"} in config["methodConfig"][0]["name"]


def test_channel_options() -> None:
    default = dict(Settings().channel_options())
    assert "grpc.use_local_subchannel_pool" not in default and default["grpc.enable_retries"] == 1
    assert default["grpc.max_receive_message_length"] == 64 * 1024 * 1024
    spread = dict(Settings(channels=4, options=(("grpc.enable_retries", 0),)).channel_options())
    assert spread["grpc.use_local_subchannel_pool"] == 1 and spread["grpc.enable_retries"] == 0
    assert dict(Settings(retry=None).channel_options())["grpc.enable_retries"] == 0
    with pytest.raises(ValueError, match="channels"):
        Client(channels=0)


# ---- deadlines and metadata ---------------------------------------------------------------------


async def test_every_call_has_a_deadline_by_default(make_server: Callable[..., Any]) -> None:
    srv = await make_server()
    async with AsyncClient(srv.address, metadata=[("authorization", "Bearer t0ken")]) as client:
        await client.predict("m", X)
        await client.predict("m", X, timeout=3)
    default, given = srv.servicer.attempts
    assert default.time_remaining is not None and 25 < default.time_remaining <= 30.5
    assert given.time_remaining is not None and 2 < given.time_remaining <= 3.5
    assert default.metadata["authorization"] == "Bearer t0ken"


async def test_a_call_that_outlives_its_deadline_fails(make_server: Callable[..., Any]) -> None:
    srv = await make_server(Scripted(hang=True))
    async with AsyncClient(srv.address, timeout=0.3) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            await client.predict("m", X)
        assert time.monotonic() - started < 3
        with pytest.raises(DeadlineExceededError):
            await client.predict("m", X, timeout=0.1)


async def test_sync_face_against_the_same_server(make_server: Callable[..., Any]) -> None:
    srv = await make_server(Scripted(failures=[grpc.StatusCode.UNAVAILABLE]))

    def call() -> int:
        with Client(srv.address, channels=2) as client:
            return client.predict("m", X).version

    assert await asyncio.to_thread(call) == 7
    assert len(srv.servicer.attempts) == 2


# ---- TLS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_credentials(
    ca: trustme.CA, *names: str, client_ca: trustme.CA | None = None
) -> grpc.ServerCredentials:
    cert = ca.issue_cert(*names)
    chain = b"".join(blob.bytes() for blob in cert.cert_chain_pems)
    return grpc.ssl_server_credentials(
        [(cert.private_key_pem.bytes(), chain)],
        root_certificates=client_ca.cert_pem.bytes() if client_ca else None,
        require_client_auth=client_ca is not None,
    )


async def test_tls_with_the_servers_ca(make_server: Callable[..., Any], ca: trustme.CA) -> None:
    srv = await make_server(credentials=server_credentials(ca, "localhost", "127.0.0.1"))
    tls = Tls(root_certificates=ca.cert_pem.bytes())
    async with AsyncClient(f"localhost:{srv.port}", tls=tls) as client:
        assert (await client.predict("m", X)).version == 7
        assert await client.health() == "SERVING"
    async with AsyncClient(srv.address, tls=tls) as client:  # the IP is in the certificate too
        assert (await client.predict("m", X)).version == 7


async def test_tls_refuses_a_server_it_cannot_verify(
    make_server: Callable[..., Any], ca: trustme.CA
) -> None:
    srv = await make_server(credentials=server_credentials(ca, "modelmux.test"))
    other = trustme.CA()
    async with AsyncClient(
        srv.address, tls=Tls(root_certificates=other.cert_pem.bytes()), retry=None
    ) as client:
        with pytest.raises(UnavailableError):
            await client.predict("m", X, timeout=5)
    # the right CA, but the certificate names modelmux.test, not 127.0.0.1: refused ...
    tls = Tls(root_certificates=ca.cert_pem.bytes())
    async with AsyncClient(srv.address, tls=tls, retry=None) as client:
        with pytest.raises(UnavailableError):
            await client.predict("m", X, timeout=5)
    # ... unless the client is told which name to check
    named = Tls(root_certificates=ca.cert_pem.bytes(), server_name="modelmux.test")
    async with AsyncClient(srv.address, tls=named) as client:
        assert (await client.predict("m", X)).version == 7


async def test_mutual_tls(make_server: Callable[..., Any], ca: trustme.CA, tmp_path: Path) -> None:
    srv = await make_server(credentials=server_credentials(ca, "localhost", client_ca=ca))
    target = f"localhost:{srv.port}"
    anonymous = Tls(root_certificates=ca.cert_pem.bytes())
    async with AsyncClient(target, tls=anonymous, retry=None) as client:
        with pytest.raises(UnavailableError):
            await client.predict("m", X, timeout=5)
    issued = ca.issue_cert("client.modelmux.test")
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem.bytes())
    (tmp_path / "client.pem").write_bytes(b"".join(b.bytes() for b in issued.cert_chain_pems))
    (tmp_path / "client.key").write_bytes(issued.private_key_pem.bytes())
    tls = Tls.from_files(
        root_certificates=tmp_path / "ca.pem",
        certificate_chain=tmp_path / "client.pem",
        private_key=tmp_path / "client.key",
    )
    async with AsyncClient(target, tls=tls) as client:
        assert (await client.predict("m", X)).version == 7
    with pytest.raises(ValueError, match="go together"):
        Tls(certificate_chain=b"x")


# ---- the probe ----------------------------------------------------------------------------------


async def test_probe_exit_codes(make_server: Callable[..., Any]) -> None:
    srv = await make_server()

    def probe(*args: str) -> int:
        command = [sys.executable, "-m", "modelmux.client.probe", *args]
        return subprocess.run(command, cwd=ROOT, timeout=30, capture_output=True).returncode

    assert await asyncio.to_thread(probe, srv.address) == 0
    # grpc_health answers NOT_FOUND for an unknown service: the probe cannot ask -> 2
    assert await asyncio.to_thread(probe, srv.address, "--service", "nope") == 2
    await srv.server.stop(0)
    assert await asyncio.to_thread(probe, srv.address, "--timeout", "1") == 2


async def test_probe_says_not_serving(make_server: Callable[..., Any]) -> None:
    servicer = health.aio.HealthServicer()
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        command = [sys.executable, "-m", "modelmux.client.probe", f"127.0.0.1:{port}"]
        done = await asyncio.to_thread(
            subprocess.run, command, cwd=ROOT, timeout=30, capture_output=True, text=True
        )
        assert done.returncode == 1 and "NOT_SERVING" in done.stderr
    finally:
        await server.stop(0)
