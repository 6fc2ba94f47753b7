"""TLS and mutual TLS end to end, with certificates made by trustme: the gateway's listener (Python
client and the real grpcurl), a certificate rotated on disk and served without a restart, an
embedded backend that requires client certificates, and modelsync's server followed over mTLS."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import structlog.testing
import trustme
from conftest import Proc, start_daemon
from gateway_helpers import wait_for, write_config
from grpc_health.v1 import health_pb2, health_pb2_grpc
from modelsync_helpers import api, cpu_model, running, write_tree
from modelsync_helpers import write_config as write_modelsync_config
from test_gateway import GRPCURL, IRIS, IRIS_INPUTS, X

from gateway.follower import Follower
from gateway.server import Gateway
from modelmux.client import Client, Tls, UnavailableError
from modelmux_common import config as config_mod
from modelmux_common.config import ClientTls

HANDLERS = Path(__file__).parent / "handlers"
SERVING = health_pb2.HealthCheckResponse.SERVING
Y = [3.5, 4.0, 5.5]  # half_plus_two v2 (the latest) of X


@dataclass(frozen=True)
class Pem:
    """A certificate and its key on disk."""

    cert: Path
    key: Path


def issue(ca: trustme.CA, folder: Path, name: str, *hosts: str) -> Pem:
    """A certificate of ``ca`` for ``hosts``, written (atomically: a rename over the old file,
    as a Kubernetes secret volume does) to ``folder/name.{pem,key}``."""
    cert = ca.issue_cert(*hosts)
    pem = Pem(folder / f"{name}.pem", folder / f"{name}.key")
    for path, data in (
        (pem.key, cert.private_key_pem.bytes()),
        (pem.cert, b"".join(c.bytes() for c in cert.cert_chain_pems)),
    ):
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return pem


def write_ca(ca: trustme.CA, path: Path) -> Path:
    ca.cert_pem.write_to_path(str(path))
    return path


@dataclass(frozen=True)
class Pki:
    folder: Path
    ca: trustme.CA
    ca_file: Path
    server: Pem  # for 127.0.0.1 and localhost
    client: Pem
    stranger: Pem  # a client certificate of another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    return Pki(
        folder,
        ca,
        write_ca(ca, folder / "ca.pem"),
        issue(ca, folder, "server", "localhost", "127.0.0.1"),
        issue(ca, folder, "client", "client.example"),
        issue(other, folder, "stranger", "stranger.example"),
    )


def client_tls(pki: Pki, pem: Pem | None = None, ca: Path | None = None) -> Tls:
    return Tls.from_files(
        root_certificates=ca or pki.ca_file,
        certificate_chain=pem.cert if pem else None,
        private_key=pem.key if pem else None,
    )


async def predict(address: str, tls: Tls | None) -> list[float]:
    """half_plus_two through the Python client, off the loop the gateway runs on."""

    def call() -> list[float]:
        with Client(address, tls=tls, retry=None, timeout=5) as client:
            reply = client.predict("half_plus_two", {"x": np.asarray(X, dtype=np.float32)})
            return [float(v) for v in reply["y"]]

    return await asyncio.to_thread(call)


async def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    """The real grpcurl. Its handshake gets 2 s, which the calls that succeed here show is
    enough: grpcurl waits that long for one that is refused instead of saying why."""
    return await asyncio.to_thread(
        subprocess.run,
        [GRPCURL, "-max-time", "10", "-connect-timeout", "2", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


async def tls_gateway(config_file: Path, tls: grpc.ChannelCredentials) -> Gateway:
    """An in-process gateway, once its health (asked over TLS) says SERVING."""
    gateway = Gateway(config_mod.load(config_file))
    address = await gateway.start()

    async def serving() -> bool:
        async with grpc.aio.secure_channel(address, tls) as channel:
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=2
                )
            except grpc.aio.AioRpcError:
                return False
            return bool(reply.status == SERVING)

    await wait_for(serving, timeout=60, what="gateway health SERVING over TLS")
    return gateway


def credentials(pki: Pki, pem: Pem | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        pki.ca_file.read_bytes(),
        pem.key.read_bytes() if pem else None,
        pem.cert.read_bytes() if pem else None,
    )


@pytest.fixture(scope="module")
async def tls_gw(
    tmp_path_factory: pytest.TempPathFactory, example_models: Path, backend: Proc, pki: Pki
) -> AsyncIterator[tuple[Gateway, Path]]:
    """A gateway serving TLS (no client certificates) from certificate files of its own, which
    the rotation test replaces."""
    folder = tmp_path_factory.mktemp("tls-gw")
    own = issue(pki.ca, folder, "server", "localhost", "127.0.0.1")
    cfg = write_config(
        folder / "modelmux.yaml",
        models=example_models,
        backends=[{"name": "cpu-0", "address": backend.address}],
        gateway={"tls": {"cert": str(own.cert), "key": str(own.key)}},
    )
    gw = await tls_gateway(cfg, credentials(pki))
    yield gw, folder
    await gw.stop()


@pytest.fixture(scope="module")
async def mtls_gw(
    tmp_path_factory: pytest.TempPathFactory, example_models: Path, backend: Proc, pki: Pki
) -> AsyncIterator[Gateway]:
    """A gateway that requires client certificates of the test CA, with a handler API."""
    tls = {"cert": str(pki.server.cert), "key": str(pki.server.key), "client_ca": str(pki.ca_file)}
    half = {"paths": [{"name": "half_plus_two", "path": str(example_models / "half_plus_two")}]}
    iris = {
        "name": "iris",
        "handler": {
            "type": "tensorflow",
            "path": str(HANDLERS / "iris_predictor.py"),
            "models": {"path": str(example_models / "iris")},
        },
    }
    cfg = write_config(
        tmp_path_factory.mktemp("mtls-gw") / "modelmux.yaml",
        models=example_models,
        backends=[{"name": "cpu-0", "address": backend.address}],
        gateway={"tls": tls},
        apis=[{"name": "half-plus-two", "handler": {"type": "tensorflow", "models": half}}, iris],
    )
    gw = await tls_gateway(cfg, credentials(pki, pki.client))
    yield gw
    await gw.stop()


# --- the gateway's listener -------------------------------------------------------------------


async def test_a_tls_client_succeeds_and_a_plaintext_one_fails(
    tls_gw: tuple[Gateway, Path], pki: Pki
) -> None:
    gw, _ = tls_gw
    assert await predict(gw.address, client_tls(pki)) == Y
    with pytest.raises(UnavailableError):
        await predict(gw.address, None)


async def test_a_client_that_does_not_trust_the_ca_fails(tls_gw: tuple[Gateway, Path]) -> None:
    gw, folder = tls_gw
    other = write_ca(trustme.CA(), folder / "other-ca.pem")
    with pytest.raises(UnavailableError):
        await predict(gw.address, Tls.from_files(root_certificates=other))


async def test_mtls_refuses_a_client_without_a_certificate(mtls_gw: Gateway, pki: Pki) -> None:
    assert await predict(mtls_gw.address, client_tls(pki, pki.client)) == Y
    with pytest.raises(UnavailableError):
        await predict(mtls_gw.address, client_tls(pki))  # no certificate
    with pytest.raises(UnavailableError):
        await predict(mtls_gw.address, client_tls(pki, pki.stranger))  # another CA's
    with pytest.raises(UnavailableError):
        await predict(mtls_gw.address, None)


async def test_a_handler_behind_an_mtls_gateway(mtls_gw: Gateway, pki: Pki) -> None:
    """Invoke over mTLS; the handler's own Predict reaches the gateway on its unix socket."""

    def invoke() -> object:
        tls = client_tls(pki, pki.client)
        with Client(mtls_gw.address, tls=tls, retry=None, timeout=30) as client:
            return client.invoke("iris", dict(zip(IRIS_INPUTS, IRIS["setosa"], strict=True)))

    assert await asyncio.to_thread(invoke) == "setosa"


async def test_grpcurl_over_tls_and_mtls(
    tls_gw: tuple[Gateway, Path], mtls_gw: Gateway, pki: Pki
) -> None:
    body = '{"model": "half_plus_two", "json_inputs": {"x": [1, 2, 5]}}'
    method = "modelmux.v1.Inference/Predict"
    ca = str(pki.ca_file)
    out = await grpcurl("-cacert", ca, "-d", body, tls_gw[0].address, method)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["json_outputs"]["y"] == Y
    plain = await grpcurl("-plaintext", tls_gw[0].address, "list")
    assert plain.returncode != 0
    no_cert = await grpcurl("-cacert", ca, mtls_gw.address, "list")
    assert no_cert.returncode != 0, no_cert.stdout
    cert = ("-cert", str(pki.client.cert), "-key", str(pki.client.key))
    out = await grpcurl("-cacert", ca, *cert, "-d", body, mtls_gw.address, method)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["json_outputs"]["y"] == Y
    stranger = ("-cert", str(pki.stranger.cert), "-key", str(pki.stranger.key))
    refused = await grpcurl("-cacert", ca, *stranger, mtls_gw.address, "list")
    assert refused.returncode != 0


def served_certificate(address: str) -> bytes:
    """The leaf certificate a new connection to ``address`` is given (DER)."""
    host, _, port = address.rpartition(":")
    pem = ssl.get_server_certificate((host, int(port)), timeout=5)
    return ssl.PEM_cert_to_DER_cert(pem)


def der(pem_file: Path) -> bytes:
    text = pem_file.read_text()
    first = text[: text.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")]
    return ssl.PEM_cert_to_DER_cert(first)


async def test_a_rotated_certificate_is_served_without_a_restart(
    tls_gw: tuple[Gateway, Path], pki: Pki
) -> None:
    """New files from a new CA, as cert-manager renews a secret: the next connection gets them,
    a client trusting only the new CA (grpcurl too) succeeds, and the gateway never restarted."""
    gw, folder = tls_gw
    old = await asyncio.to_thread(served_certificate, gw.address)
    assert old == der(folder / "server.pem")
    renewed = trustme.CA()
    new_ca = write_ca(renewed, folder / "renewed-ca.pem")
    with structlog.testing.capture_logs() as logs:
        issue(renewed, folder, "server", "localhost", "127.0.0.1")
        want = der(folder / "server.pem")
        await wait_for(
            lambda: _served(gw.address, want),
            timeout=10,
            what="the renewed certificate served",
        )
    assert any(e["event"] == "tls_reloaded" and e["server"] == "gateway" for e in logs), logs
    assert await predict(gw.address, Tls.from_files(root_certificates=new_ca)) == Y
    with pytest.raises(UnavailableError):  # the old CA no longer matches what is served
        await predict(gw.address, client_tls(pki))
    out = await grpcurl("-cacert", str(new_ca), gw.address, "list")
    assert out.returncode == 0 and "modelmux.v1.Inference" in out.stdout, out.stderr


async def _served(address: str, want: bytes) -> bool:
    return await asyncio.to_thread(served_certificate, address) == want


async def test_a_broken_renewal_keeps_the_current_certificate(
    tls_gw: tuple[Gateway, Path],
) -> None:
    """A key that is not the certificate's: logged once, and the last good pair stays served."""
    gw, folder = tls_gw
    before = await asyncio.to_thread(served_certificate, gw.address)
    other = trustme.CA().issue_cert("localhost")
    with structlog.testing.capture_logs() as logs:
        tmp = folder / "server.key.tmp"
        tmp.write_bytes(other.private_key_pem.bytes())
        os.replace(tmp, folder / "server.key")
        for _ in range(3):
            assert await asyncio.to_thread(served_certificate, gw.address) == before
    failed = [e for e in logs if e["event"] == "tls_reload_failed"]
    assert len(failed) == 1 and "is not the private key" in failed[0]["error"], logs


# --- the gateway to a backend that requires client certificates ----------------------------


@pytest.fixture(scope="module")
def mtls_backend(pki: Pki) -> Iterator[Proc]:
    """The embedded backend behind mutual TLS, as TF Serving behind a TLS proxy."""
    proc = start_daemon(
        [
            "backend",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            str(pki.server.cert),
            "--tls-key",
            str(pki.server.key),
            "--tls-client-ca",
            str(pki.ca_file),
        ]
    )
    yield proc
    proc.stop()


async def test_backend_mtls(
    tmp_path: Path, example_models: Path, mtls_backend: Proc, pki: Pki
) -> None:
    """The gateway loads and routes models on a backend it reaches over mTLS; a new client
    certificate (rotated files) opens a new channel and keeps working; a client without a
    certificate is refused by the backend."""
    folder = tmp_path
    own = issue(pki.ca, folder, "gw-client", "gateway.example")
    tls = {"ca": str(pki.ca_file), "cert": str(own.cert), "key": str(own.key)}
    cfg = write_config(
        folder / "modelmux.yaml",
        models=example_models,
        backends=[{"name": "tls-0", "address": mtls_backend.address, "tls": tls}],
        gateway={"status_interval": "200ms"},
    )
    gw = Gateway(config_mod.load(cfg))
    address = await gw.start()
    try:
        await wait_for(lambda: "half_plus_two" in gw.fleet.table.routes, timeout=60, what="routes")
        assert await predict(address, None) == Y
        with structlog.testing.capture_logs() as logs:
            issue(pki.ca, folder, "gw-client", "gateway.example")
            await wait_for(
                lambda: any(e["event"] == "backend_tls_reloaded" for e in logs),
                timeout=10,
                what="a new backend channel",
            )
        assert await predict(address, None) == Y
    finally:
        await gw.stop()
    async with grpc.aio.secure_channel(mtls_backend.address, credentials(pki)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


# --- modelsync's server and the gateway's subscription ---------------------------------------


async def health_error(address: str, tls: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    """The status a Health check gets from ``address`` (OK when it answers)."""
    channel = (
        grpc.aio.insecure_channel(address) if tls is None else grpc.aio.secure_channel(address, tls)
    )
    async with channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def test_modelsync_over_mtls(tmp_path: Path, pki: Pki) -> None:
    """The gateway's follower, with the CA and a client certificate, gets the catalogue from a
    modelsync that requires client certificates; a plaintext client and one without a
    certificate are refused."""
    write_tree(tmp_path / "src" / "m" / "1", cpu_model("a"))
    tls = {"cert": str(pki.server.cert), "key": str(pki.server.key), "client_ca": str(pki.ca_file)}
    _, config = write_modelsync_config(
        tmp_path, [api("m", {"path": str(tmp_path / "src" / "m")})], tls=tls
    )
    good = ClientTls(ca=str(pki.ca_file), cert=str(pki.client.cert), key=str(pki.client.key))
    async with running(config) as daemon:
        follower = Follower(daemon.address, lambda _: None, tls=good)
        follower.start()
        try:
            await wait_for(
                lambda: follower.synced.is_set() and "m" in follower.catalog(),
                timeout=20,
                what="the catalogue over mTLS",
            )
            assert follower.connected
        finally:
            await follower.close()
        assert (
            await health_error(daemon.address, credentials(pki, pki.client)) == grpc.StatusCode.OK
        )
        assert await health_error(daemon.address, None) == grpc.StatusCode.UNAVAILABLE
        assert await health_error(daemon.address, credentials(pki)) == grpc.StatusCode.UNAVAILABLE
