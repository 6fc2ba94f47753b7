"""Property-based tests over the parsers of untrusted input that are not wire walking or tensors
(those are in test_wire.py and test_tensors.py): the config file (random YAML documents and
values, random bytes, the environment), async payloads and request ids, modelsync's keys.
Each either answers or fails with its own clean error, never another exception."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.asyncapi import payloads
from gateway.asyncapi.service import AsyncApis
from gateway.edge import _request_id
from gateway.errors import InvalidArgument
from gateway.work import open_embedded
from gateway.work.base import check_key
from modelmux_common.config import NAME_RE, ConfigError, load
from modelmux_common.config.fields import key_of, spec_of
from modelmux_common.config.schema import Document
from modelmux_common.grpcutil import add_health_and_reflection
from modelsync.layout import ObjectInfo, group, hostile_reason, validate
from modelsync.sources import LocalSource
from modelsync.transfer import safe_join
from unit.unit_helpers import Context

# bounded: the tier stays within seconds; a deadline catches an input that makes a parser hang
FAST = settings(max_examples=60, deadline=5000)

# --- the config file ---------------------------------------------------------------------------

BASE = {
    "gateway": {"listen": "127.0.0.1:0", "modelsync": "127.0.0.1:1", "state_dir": "state"},
    "modelsync": {"listen": "127.0.0.1:0", "target": "volume"},
    "backends": [{"name": "cpu-0", "address": "127.0.0.1:9000", "accelerator": "cpu"}],
    "version_labels": {"m": {"stable": 1}},
    "apis": [
        {
            "name": "m",
            "handler": {
                "type": "tensorflow",
                "models": {"path": "m"},
                "server_side_batching": {"max_batch_size": 8},
            },
        },
        {
            "name": "py",
            "handler": {
                "type": "python",
                "path": "h.py",
                "protobuf_path": "s.proto",
                "multi_model_reloading": {"dir": "models"},
            },
            "compute": {"cpu": 1},
        },
        {
            "name": "a",
            "kind": "AsyncAPI",
            "handler": {"type": "python", "path": "h.py"},
            "async": {"store": "embedded", "max_attempts": 3},
        },
    ],
}


def _key_paths(cls: type, prefix: tuple[str | int, ...]) -> Iterator[tuple[str | int, ...]]:
    """Every key of the schema, as a path into a document (lists at index 0)."""
    for f in dataclasses.fields(cls):
        spec, path = spec_of(f), (*prefix, key_of(f))
        if spec.section is None:
            yield path
        else:
            yield path
            yield from _key_paths(spec.section, (*path, 0) if spec.many else path)


KEY_PATHS = sorted(_key_paths(Document, ()), key=str)
KEY_NAMES = sorted({str(p[-1]) for p in KEY_PATHS if isinstance(p[-1], str)})

# what yaml.safe_load can give: scalars of every tag, then lists and mappings of them
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**300, max_value=10**400)
    | st.floats()
    | st.text(max_size=40)
    | st.text(alphabet="0123456789.smhKMGTiB -", max_size=12)
    | st.sampled_from(["", "0", "-1", "1e999", "10s", "64MiB", "s3://", "dns:x", "unix:", "a\0b"])
    | st.dates()
    | st.binary(max_size=10)
)
KEYS = st.sampled_from(KEY_NAMES) | st.text(max_size=10) | st.integers()
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("config")
    (root / "h.py").write_text("class Handler:\n    pass\n")
    (root / "s.proto").write_text('syntax = "proto3";\n')
    return root


def loads_or_names_file_and_key(file: Path, data: bytes) -> Any:
    """The Config, or None after a ConfigError naming ``file`` and a key: nothing else escapes."""
    file.write_bytes(data)
    try:
        return load(file, daemon="gateway")
    except ConfigError as exc:
        assert exc.file == str(file), exc
        assert exc.key and exc.reason, exc
        return None


def test_the_base_document_loads(folder: Path) -> None:
    config = loads_or_names_file_and_key(folder / "c.yaml", yaml.safe_dump(BASE).encode())
    assert [a.name for a in config.apis] == ["m", "py", "a"]
    assert {p[0] for p in KEY_PATHS} == set(BASE) and len(KEY_PATHS) > 80


def _set(doc: Any, path: tuple[str | int, ...], value: Any, index: int) -> None:
    for i, part in enumerate(path[:-1]):
        if isinstance(part, int):
            part = index % len(doc) if isinstance(doc, list) and doc else 0
            if not isinstance(doc, list) or not doc:
                return
        elif not isinstance(doc, dict):
            return
        nxt = doc[part] if part in doc or isinstance(doc, list) else None
        if not isinstance(nxt, dict | list):
            nxt = [] if isinstance(path[i + 1], int) else {}
            doc[part] = nxt
        doc = nxt
    if isinstance(doc, dict):
        doc[path[-1]] = value


@FAST
@given(
    changes=st.lists(
        st.tuples(st.sampled_from(KEY_PATHS), VALUES, st.integers(0, 2)), min_size=1, max_size=3
    )
)
@example(changes=[(("gateway", "workers"), float("inf"), 0)])
@example(changes=[(("gateway", "shutdown_grace"), 10**400, 0)])
@example(changes=[(("gateway", "shutdown_grace"), float("nan"), 0)])
@example(changes=[(("gateway", "max_message_bytes"), "9" * 400, 0)])
@example(changes=[(("apis", 0, "handler", "path"), "h" * 300 + ".py", 1)])
def test_any_value_at_any_key(folder: Path, changes: list[tuple[Any, Any, int]]) -> None:
    doc = json.loads(json.dumps(BASE))
    for path, value, index in changes:
        _set(doc, path, value, index)
    loads_or_names_file_and_key(folder / "c.yaml", yaml.safe_dump(doc).encode())


@FAST
@given(doc=st.dictionaries(st.sampled_from(sorted(BASE)) | KEYS, VALUES, max_size=5))
def test_any_document(folder: Path, doc: dict[Any, Any]) -> None:
    loads_or_names_file_and_key(folder / "c.yaml", yaml.safe_dump(doc).encode())


@FAST
@given(
    edits=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 8), st.binary(max_size=6)), max_size=4)
)
@example(edits=[(0.1, 0, b"\xff\xfe")])  # not UTF-8: UnicodeDecodeError
@example(edits=[(0.0, 0, b"[" * 500)])  # PyYAML composes recursively: RecursionError
def test_any_bytes_in_the_file(folder: Path, edits: list[tuple[float, int, bytes]]) -> None:
    """The base document's text with bytes cut out and others put in."""
    data = bytearray(yaml.safe_dump(BASE).encode())
    for where, cut, new in edits:
        at = int(where * len(data))
        data[at : at + cut] = new
    loads_or_names_file_and_key(folder / "c.yaml", bytes(data))


@FAST
@given(
    env=st.dictionaries(
        st.sampled_from([k for k in KEY_PATHS if len(k) == 2 and k[0] in ("gateway", "modelsync")]),
        st.text(max_size=20).filter(lambda t: "\0" not in t),
        max_size=3,
    )
)
def test_any_environment_value(folder: Path, env: dict[tuple[str, str], str]) -> None:
    names = {f"MODELMUX_{s.upper()}_{k.upper()}": v for (s, k), v in env.items()}
    os.environ.update(names)
    try:
        loads_or_names_file_and_key(folder / "c.yaml", yaml.safe_dump(BASE).encode())
    finally:
        for name in names:
            del os.environ[name]


# --- async payloads and request ids ------------------------------------------------------------

JSON_TEXT = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=10,
).map(json.dumps)
CONTENT_TYPES = st.sampled_from(
    ["", "application/json", "Application/JSON; charset=utf-8", "application/x+json", "text/plain",
     "text/csv;q=1", "application/octet-stream", ";", " text/ "]
) | st.text(max_size=30)  # fmt: skip


@given(
    body=st.binary(max_size=200)
    | JSON_TEXT.map(str.encode)
    | st.integers(1, 10**5).map(lambda n: b"[" * n),
    content_type=CONTENT_TYPES,
)
@example(body=b"[" * 100_000, content_type="application/json")  # was RecursionError: INTERNAL
@example(body=b'{"a": "\xff"}', content_type="application/json")
def test_a_payload_decodes_or_is_a_value_error(body: bytes, content_type: str) -> None:
    """What Submit turns into INVALID_ARGUMENT (and a handler worker decodes again)."""
    try:
        value = payloads.decode(body, content_type)
    except ValueError:
        assert payloads.is_json(content_type) or payloads.media_type(content_type).startswith(
            "text/"
        )
        return
    if not payloads.is_json(content_type):
        assert value == body or value == body.decode()


@given(request_id=st.text(max_size=200) | st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,140}\Z"))
@example(request_id="a\n")
@example(request_id="a" * 128)
def test_a_request_id_is_checked_before_it_becomes_a_store_key(request_id: str) -> None:
    problem = payloads.check_id(request_id)
    if problem is not None:
        with pytest.raises(InvalidArgument, match=r"is not a request id|id is required"):
            AsyncApis._id(request_id)
        return
    assert 1 <= len(request_id) <= 128 and NAME_RE.match(request_id)
    assert AsyncApis._id(request_id) == request_id
    for part in ("payload", "status"):
        check_key(f"some-api/{request_id}/{part}")


@given(content_type=CONTENT_TYPES | st.text(max_size=300))
@example(content_type="text/plain\n")  # each run of it crashed: not a valid metadata value
@example(content_type="application/jsön")
@example(content_type="a" * 257)
def test_a_content_type_is_checked_before_it_travels_as_metadata(content_type: str) -> None:
    problem = payloads.check_content_type(content_type)
    printable = all(" " <= c <= "~" for c in content_type)
    assert (problem is None) == (printable and len(content_type) <= 256)


def test_new_ids_are_valid_and_in_submission_order() -> None:
    ids = [payloads.new_id() for _ in range(50)]
    assert all(payloads.check_id(i) is None for i in ids)
    assert [i[:12] for i in ids] == sorted(i[:12] for i in ids) and len(set(ids)) == 50


@given(
    metadata=st.lists(
        st.tuples(st.sampled_from(["x-request-id", "user-agent", "x"]), st.text(max_size=30)),
        max_size=4,
    )
)
def test_the_edge_request_id_is_the_callers_first_or_its_own(
    metadata: list[tuple[str, str]],
) -> None:
    given_ids = [v for k, v in metadata if k == "x-request-id" and v]
    found = _request_id(Context(tuple(metadata)))  # type: ignore[arg-type]
    if given_ids:
        assert found == given_ids[0]
    else:
        assert re.fullmatch(r"[0-9a-f]+-\d+", found)


# --- modelsync keys ----------------------------------------------------------------------------

SEGMENTS = (
    st.sampled_from(["1", "2", "07", "0", "9" * 19, ".", "..", "", "m", "saved_model.pb",
                     "variables", "variables.index", "a b", "é", "\udcff", "x\\y", "a\nb"])
    | st.text(max_size=8)
    | st.text(alphabet=st.characters(categories=["Cs", "Cc", "Lu"]), max_size=4)
    | st.just("s" * 256)
)  # fmt: skip
KEYS_OF_A_SOURCE = st.lists(SEGMENTS, min_size=1, max_size=5).map("/".join)


@settings(max_examples=150, deadline=5000)
@given(
    keys=st.lists(KEYS_OF_A_SOURCE, max_size=12, unique=True),
    model=st.none() | st.just("m"),
    sizes=st.lists(st.integers(0, 3), min_size=12, max_size=12),
)
@example(keys=["1/saved_model.pb", "1/\udcff"], model="m", sizes=[1] * 12)
def test_every_key_is_a_file_of_a_version_ignored_or_refused(
    tmp_path_factory: pytest.TempPathFactory,
    keys: list[str],
    model: str | None,
    sizes: list[int],
) -> None:
    listing = {k: ObjectInfo(sizes[i], f"etag-{i}") for i, k in enumerate(keys)}
    grouping = group(listing, model=model)
    root = tmp_path_factory.getbasetemp() / "volume"
    placed = 0
    for (name, version), cand in grouping.candidates.items():
        assert NAME_RE.match(name) and 0 <= version < 2**63
        assert isinstance(validate(cand.files, inferentia=False), list)
        for path, info in cand.files.items():
            key = cand.key(path)
            assert listing[key] is info and not hostile_reason(key)
            assert root.resolve() in safe_join(root, f"{name}/{version}/{path}").parents
        placed += len(cand.files) + len(cand.problems)
    markers = sum(1 for k, i in listing.items() if (k == "" or k.endswith("/")) and not i.size)
    refused = 0
    for problem in grouping.problems:
        found = re.match(r"refused (\d+) key", problem.reason)
        refused += int(found.group(1)) if found else 1
    assert placed + len(grouping.ignored) + refused + markers == len(listing)


def test_a_local_file_name_that_is_not_utf8_refuses_its_version(tmp_path: Path) -> None:
    """It made every listing of the source raise UnicodeEncodeError (the whole source failed,
    every model of it, on every tick)."""
    good = tmp_path / "m" / "1"
    bad = tmp_path / "m" / "2"
    for version in (good, bad):
        version.mkdir(parents=True)
        (version / "saved_model.pb").write_bytes(b"graph")
    (bad / os.fsdecode(b"notes-\xff.txt")).write_bytes(b"?")
    grouping = group(LocalSource(str(tmp_path)).list().objects, model=None)
    assert not grouping.candidates[("m", 1)].problems
    assert grouping.candidates[("m", 2)].problems == [
        "refused key 'm/2/notes-\\udcff.txt': is not valid UTF-8"
    ]


# --- health and reflection: bytes that do not parse --------------------------------------------


async def test_health_and_reflection_answer_invalid_argument_to_bytes_that_do_not_parse() -> None:
    """Every method, Health/List included: the aio health servicer does not implement it, and its
    generated stub (a sync function) was registered as it was, so bytes that do not parse got
    UNKNOWN "Unexpected <class DecodeError>" (found by the live fuzz, which covers what
    reflection lists)."""
    server = grpc.aio.server()
    add_health_and_reflection(server, [])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    methods = {
        "/grpc.health.v1.Health/Check": "unary",
        "/grpc.health.v1.Health/List": "unary",
        "/grpc.health.v1.Health/Watch": "server",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": "bidi",
    }
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for method, kind in methods.items():
                for data in (b"\x80", b"\x0a\x05abc", b"\x0b"):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        if kind == "unary":
                            await channel.unary_unary(method)(data, timeout=5)
                        elif kind == "server":
                            async for _ in channel.unary_stream(method)(data, timeout=5):
                                pass
                        else:
                            async for _ in channel.stream_stream(method)(iter([data]), timeout=5):
                                pass
                    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, data)
                    assert "request is not a valid grpc." in (info.value.details() or "")
            empty = channel.unary_unary("/grpc.health.v1.Health/List")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await empty(b"", timeout=5)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(None)


@settings(max_examples=30, deadline=5000)
@given(token=st.text(max_size=40) | st.binary(max_size=30).map(lambda b: b.hex()))
@example(token="\udcff")
@example(token="_w==")  # valid base64 of a byte that is not UTF-8
def test_a_page_token_lists_a_page_or_is_a_value_error(
    tmp_path_factory: pytest.TempPathFactory, token: str
) -> None:
    """Async.List passes the caller's page_token to the store: a ValueError there is its
    INVALID_ARGUMENT ("page_token is not one this API's List returned")."""

    async def page() -> None:
        work = await open_embedded(tmp_path_factory.getbasetemp() / "work")
        try:
            await work.store.list("api/", limit=5, token=token)
        except ValueError:
            pass
        finally:
            await work.close()

    asyncio.run(page())
