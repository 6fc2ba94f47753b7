"""modelsync's pure parts: keys -> versions, hostile keys, layouts, change classification,
the event log's resumption rules, the state file."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from modelsync import state as state_file
from modelsync.events import Event, EventKind, EventLog
from modelsync.layout import ObjectInfo, group, hostile_reason, validate
from modelsync.plan import classify, make_plan
from modelsync.state import FileRecord, PendingRemoval, Published, State, StateError
from modelsync.transfer import safe_join


def info(tag: str = "x", size: int = 5) -> ObjectInfo:
    return ObjectInfo(size, f"etag-{tag}")


CPU = ["saved_model.pb", "variables/variables.index", "variables/variables.data-00000-of-00001"]


def listing(keys: list[str], tag: str = "x") -> dict[str, ObjectInfo]:
    return {k: info(tag) for k in keys}


def test_versioned_path_source() -> None:
    g = group(listing([f"1/{k}" for k in CPU] + ["2/saved_model.pb", "README.md"]), model="m")
    assert sorted(g.candidates) == [("m", 1), ("m", 2)]
    assert sorted(g.candidates[("m", 1)].files) == sorted(CPU)
    assert g.candidates[("m", 1)].prefix == "1/"
    assert g.ignored == ["README.md"]


def test_unversioned_source_is_version_1() -> None:
    g = group(listing(CPU), model="m")
    assert list(g.candidates) == [("m", 1)]
    assert g.candidates[("m", 1)].prefix == ""
    assert sorted(g.candidates[("m", 1)].files) == sorted(CPU)


def test_dir_source_models_and_folder_markers() -> None:
    keys = ["a/7/saved_model.pb", "b/saved_model.pb", "notes.txt"]
    raw = listing(keys)
    raw["a/"] = ObjectInfo(0, "d41d8cd98f00b204e9800998ecf8427e")
    raw["a/7/variables/"] = ObjectInfo(0, "d41d8cd98f00b204e9800998ecf8427e")
    g = group(raw, model=None)
    assert sorted(g.candidates) == [("a", 7), ("b", 1)]
    assert g.candidates[("a", 7)].prefix == "a/7/"
    assert g.candidates[("b", 1)].prefix == "b/"
    assert g.ignored == ["notes.txt"]
    assert not g.problems


def test_non_canonical_version_folders_are_not_versions() -> None:
    g = group(listing(["007/saved_model.pb"]), model="m")
    # No integer folder: the whole source is version 1, whose layout is then wrong.
    assert list(g.candidates) == [("m", 1)]
    assert validate(g.candidates[("m", 1)].files, inferentia=False)


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("1/../../etc/passwd", "'..'"),
        ("1/./saved_model.pb", "'..'"),
        ("/abs/saved_model.pb", "absolute"),
        ("1/a\\b", "backslash"),
        ("1//saved_model.pb", "empty"),
        ("1/bad\nname", "control"),
    ],
)
def test_hostile_keys_make_their_version_invalid(key: str, why: str) -> None:
    assert why in hostile_reason(key)
    g = group(listing(["1/saved_model.pb", key, "2/saved_model.pb"]), model="m")
    problems = [p for c in g.candidates.values() for p in c.problems] + [
        p.reason for p in g.problems
    ]
    assert any(why in p for p in problems), problems
    # Never part of any version's files.
    assert all(key not in c.files and key[2:] not in c.files for c in g.candidates.values())
    assert not g.candidates[("m", 2)].problems


def test_hostile_model_names_in_a_dir_source() -> None:
    g = group(
        listing(["../escape/1/saved_model.pb", "bad name/1/saved_model.pb", "ok/1/saved_model.pb"]),
        model=None,
    )
    assert list(g.candidates) == [("ok", 1)]
    reasons = " | ".join(p.reason for p in g.problems)
    assert "'..'" in reasons and "'bad name'" in reasons


def test_safe_join_refuses_escapes(tmp_path: Path) -> None:
    assert safe_join(tmp_path, "a/b") == tmp_path / "a" / "b"
    for bad in ("../x", "/etc/passwd", "a/../../x", "a\\..\\x"):
        with pytest.raises(ValueError):
            safe_join(tmp_path, bad)


def test_cpu_layout() -> None:
    ok = {k: info() for k in CPU}
    assert validate(ok, inferentia=False) == []
    assert validate({"saved_model.pb": info()}, inferentia=False) == []
    missing_index = {k: info() for k in CPU if not k.endswith("index")}
    assert "variables.index" in validate(missing_index, inferentia=False)[0]
    no_graph = {k: info() for k in CPU[1:]}
    assert "saved_model.pb" in validate(no_graph, inferentia=False)[0]
    shards = {
        "saved_model.pb": info(),
        "variables/variables.index": info(),
        "variables/variables.data-00000-of-00003": info(),
        "variables/variables.data-00002-of-00003": info(),
    }
    assert "00001-of-00003" in validate(shards, inferentia=False)[0]
    assert "empty" in validate({"saved_model.pb": info(size=0)}, inferentia=False)[0]


def test_inferentia_layout() -> None:
    assert validate({"saved_model.pb": info()}, inferentia=True) == []
    problems = validate({k: info() for k in CPU}, inferentia=True)
    assert len(problems) == 1 and "Inferentia layout" in problems[0]


def test_python_handler_versions_hold_any_files() -> None:
    assert validate({"model.pkl": info()}, inferentia=False, savedmodel=False) == []
    assert validate({"data.txt": info(size=0)}, inferentia=True, savedmodel=False) == []
    assert validate({}, inferentia=False, savedmodel=False) == ["the version folder holds no files"]
    assert validate({"model.pkl": info()}, inferentia=False)  # a SavedModel source refuses it
    g = group(
        listing(["a/model.pkl", "b/1/data.txt", "b/2/x/y.bin", "c/1/ok", "c/1/b\\ad"]), model=None
    )
    plan = make_plan(
        g,
        published={},
        inferentia=False,
        savedmodel=False,
        owner=lambda m: None,
        source_id="py/*",
    )
    assert [(c.candidate.model, c.candidate.version) for c in plan.publish] == [
        ("a", 1),
        ("b", 1),
        ("b", 2),
    ]
    assert [(p.model, p.version) for p in plan.rejected] == [("c", 1)]
    assert "backslash" in plan.rejected[0].reason


def published(files: dict[str, ObjectInfo], *, source: str = "api/m") -> Published:
    from modelsync.layout import content_digest

    return Published(
        model="m",
        version=1,
        api="api",
        inferentia=False,
        source_id=source,
        source_uri="s3://b/m/",
        revision=3,
        digest=content_digest(files.items()),
        store=".store/m/r3/1",
        files={p: FileRecord(f"1/{p}", i.size, i.etag) for p, i in files.items()},
        published_at=0.0,
    )


def test_classify_the_four_triggers() -> None:
    old_files = {k: info("a") for k in CPU}
    old = published(old_files)
    same = group({f"1/{k}": v for k, v in old_files.items()}, model="m").candidates[("m", 1)]
    assert classify(same, old) is None
    added = classify(same, None)
    assert added is not None and added.kind is EventKind.VERSION_ADDED
    more = group({f"1/{k}": info("a") for k in [*CPU, "assets/vocab.txt"]}, model="m")
    change = classify(more.candidates[("m", 1)], old)
    assert change is not None and change.kind is EventKind.STRUCTURE_CHANGED
    assert "assets/vocab.txt" in change.reason
    rewritten = {f"1/{k}": info("a") for k in CPU}
    rewritten["1/variables/variables.data-00000-of-00001"] = info("b")
    change = classify(group(rewritten, model="m").candidates[("m", 1)], old)
    assert change is not None and change.kind is EventKind.CONTENT_UPDATED
    assert "variables.data-00000-of-00001" in change.reason


def test_plan_removes_rejects_and_respects_ownership() -> None:
    old = published({k: info() for k in CPU})
    g = group(listing(["2/variables/variables.index"]), model="m")
    plan = make_plan(
        g, published={("m", 1): old}, inferentia=False, owner=lambda m: None, source_id="api/m"
    )
    assert plan.remove == [old]
    assert [(p.model, p.version) for p in plan.rejected] == [("m", 2)]
    taken = make_plan(
        group(listing(["saved_model.pb"]), model="m"),
        published={},
        inferentia=False,
        owner=lambda m: "other/*",
        source_id="api/m",
    )
    assert "other/*" in taken.rejected[0].reason and not taken.publish


def ev(revision: int) -> Event:
    return Event(revision=revision, kind=EventKind.VERSION_ADDED, time=0.0, model="m", version=1)


async def test_event_log_resumption_rules() -> None:
    log = EventLog(capacity=3, revision=10)
    assert log.after(10) == []
    assert log.after(9) is None  # before what this process knows
    assert log.after(11) is None  # ahead of the server
    for r in range(11, 16):
        log.append(ev(r))
    assert [e.revision for e in log.after(12) or []] == [13, 14, 15]
    assert log.after(11) is None  # 12 is no longer retained
    with pytest.raises(ValueError):
        log.append(ev(15))


async def test_subscription_is_bounded() -> None:
    log = EventLog(capacity=100, revision=0)
    sub = log.subscribe(limit=2)
    for r in range(1, 5):
        log.append(ev(r))
    got = [e.revision async for e in sub]
    assert got == [1, 2] and sub.lagged
    live = log.subscribe(limit=10)
    waiter = asyncio.ensure_future(live.__anext__())
    await asyncio.sleep(0)
    log.append(ev(5))
    assert (await asyncio.wait_for(waiter, 5)).revision == 5
    log.close()
    assert [e async for e in live] == []


def test_state_roundtrip_and_corruption(tmp_path: Path) -> None:
    path = tmp_path / ".modelsync" / "state.json"
    assert state_file.load(path).revision == 0
    p = published({k: info() for k in CPU})
    st = State(revision=7, published={("m", 1): p}, pending=[PendingRemoval(".store/m/r2", 5.0)])
    state_file.save(path, st)
    again = state_file.load(path)
    assert again.revision == 7 and again.published[("m", 1)] == p
    assert again.pending == st.pending
    assert json.loads(path.read_text())["format"] == 1
    assert not list(path.parent.glob(".*tmp"))
    path.write_text("{not json")
    with pytest.raises(StateError):
        state_file.load(path)
