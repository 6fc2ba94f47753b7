"""TLS files and bearer tokens in the config: checked at load with the key and the reason (never a
token), and the bearer check of gateway/auth.py on metadata alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from gateway.auth import Authorizer
from gateway.errors import PermissionDenied, Unauthenticated
from modelmux_common.config import ClientTls, ConfigError, load
from modelmux_common.config.schema import AuthSpec, TokenSpec
from modelmux_common.security import ClientCertificates

SECRET = "s3cr3t-token_value~1"


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("pem")
    ca = trustme.CA()
    leaf, other = ca.issue_cert("localhost"), ca.issue_cert("other")
    files = {
        "cert": leaf.cert_chain_pems[0].bytes(),
        "key": leaf.private_key_pem.bytes(),
        "other_key": other.private_key_pem.bytes(),
        "ca": ca.cert_pem.bytes(),
        "junk": b"not a certificate\n",
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: str(folder / name) for name in files}


def fails(folder: Path, doc: dict[str, Any]) -> ConfigError:
    path = folder / "modelmux.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as info:
        load(path)
    return info.value


def test_server_tls_is_checked_at_load(tmp_path: Path, pem: dict[str, str]) -> None:
    def tls(**keys: str) -> dict[str, Any]:
        return {"gateway": {"tls": keys}}

    error = fails(tmp_path, tls(cert=pem["cert"], key=pem["other_key"]))
    assert error.key == "gateway.tls.key" and "is not the private key" in error.reason
    error = fails(tmp_path, tls(cert=pem["junk"], key=pem["key"]))
    assert error.key == "gateway.tls.key" and "holds no PEM certificate" in error.reason
    error = fails(tmp_path, tls(cert=pem["cert"]))
    assert error.key == "gateway.tls.key" and error.reason == "required"
    error = fails(tmp_path, tls(cert=pem["cert"], key=pem["key"], client_ca=pem["junk"]))
    assert error.key == "gateway.tls.client_ca"
    error = fails(tmp_path, {"modelsync": {"tls": {"cert": "missing.pem", "key": pem["key"]}}})
    assert error.key == "modelsync.tls.cert" and "does not exist" in error.reason
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(tls(cert=pem["cert"], key=pem["key"], client_ca=pem["ca"])))
    assert load(good).gateway.tls is not None


def test_client_tls_is_checked_at_load(tmp_path: Path, pem: dict[str, str]) -> None:
    def backend(**tls: str) -> dict[str, Any]:
        return {"backends": [{"address": "127.0.0.1:9000", "tls": tls}]}

    error = fails(tmp_path, backend(cert=pem["cert"]))
    assert error.key == "backends[0].tls.key" and "go together" in error.reason
    error = fails(tmp_path, backend(ca=pem["junk"]))
    assert error.key == "backends[0].tls.ca"
    error = fails(tmp_path, {"gateway": {"modelsync_tls": {"cert": pem["cert"], "key": pem["ca"]}}})
    assert error.key == "gateway.modelsync_tls.key" and "no PEM private key" in error.reason


def test_tokens_are_checked_at_load_and_never_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def auth(**spec: str) -> dict[str, Any]:
        return {"gateway": {"auth": {"predict": spec}}}

    error = fails(tmp_path, auth())
    assert error.key == "gateway.auth.predict" and "exactly one of file and env" in error.reason
    error = fails(tmp_path, auth(env="MODELMUX_TEST_UNSET_TOKEN"))
    assert error.key == "gateway.auth.predict.env" and "holds no token" in error.reason
    spaced = tmp_path / "spaced"
    spaced.write_text(f"{SECRET}\nnot a {SECRET}\n")
    error = fails(tmp_path, auth(file=str(spaced)))
    assert error.key == "gateway.auth.predict.file" and "token 2 is not a bearer token" in str(
        error
    )
    assert SECRET not in str(error)
    error = fails(tmp_path, {"gateway": {"auth": {"jobs": {"file": "nowhere"}}}})
    assert error.key == "gateway.auth.jobs.file" and "does not exist" in error.reason
    monkeypatch.setenv("MODELMUX_TEST_TOKEN", SECRET)
    good = tmp_path / "good.yaml"
    good.write_text(
        yaml.safe_dump({"gateway": {"auth": {"async": {"env": "MODELMUX_TEST_TOKEN"}}}})
    )
    assert load(good).gateway.auth.async_ == TokenSpec(env="MODELMUX_TEST_TOKEN")


class Context:
    """The one method of a servicer context the check reads."""

    def __init__(self, *metadata: tuple[str, str]) -> None:
        self.metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata


def test_the_bearer_check(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"old-token\n\n{SECRET}\n")
    auth = Authorizer(AuthSpec(predict=TokenSpec(file=str(tokens))))
    assert auth.guard("invoke") is None  # open: nothing runs per call
    check = auth.guard("predict")
    assert check is not None
    for token in ("old-token", SECRET):
        check(Context(("authorization", f"Bearer {token}")))  # type: ignore[arg-type]
    for metadata in ((), (("authorization", "Basic abc"),), (("authorization", "Bearer "),)):
        with pytest.raises(Unauthenticated):
            check(Context(*metadata))  # type: ignore[arg-type]
    with pytest.raises(PermissionDenied) as info:
        check(Context(("authorization", f"Bearer {SECRET}x")))  # type: ignore[arg-type]
    assert SECRET not in info.value.message
    with pytest.raises(ValueError, match="unknown API"):
        auth.guard("predcit")


def test_a_handler_call_passes_only_with_the_secret(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(SECRET)
    mark = ("x-modelmux-handler-call", "the-secret")
    auth = Authorizer(
        AuthSpec(invoke=TokenSpec(file=str(tokens))),
        from_handler=lambda context: mark in context.invocation_metadata(),
    )
    auth.check("invoke", Context(mark))  # type: ignore[arg-type]
    with pytest.raises(Unauthenticated):
        auth.check("invoke", Context(("x-modelmux-handler-call", "1")))  # type: ignore[arg-type]


def test_client_certificates_tell_when_their_files_changed(
    tmp_path: Path, pem: dict[str, str]
) -> None:
    """What makes the gateway open a new backend or modelsync channel: a file replaced (a
    rename over it, as a secret volume does), not a file left as it is or one missing a moment."""
    ca = tmp_path / "ca.pem"
    ca.write_bytes(Path(pem["ca"]).read_bytes())
    files = ClientCertificates(ClientTls(ca=str(ca), cert=pem["cert"], key=pem["key"]))
    files.credentials()
    assert not files.changed()
    renewed = tmp_path / "renewed.pem"
    renewed.write_bytes(trustme.CA().cert_pem.bytes())
    renewed.replace(ca)
    assert files.changed()
    files.credentials()
    assert not files.changed()
    ca.unlink()
    assert not files.changed()  # being replaced: the next check sees the new file
