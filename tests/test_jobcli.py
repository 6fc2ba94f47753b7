"""``modelmux job``, the real command in a subprocess against a real gateway process serving a
BatchAPI (the batch recorder handler, embedded store): every action, its JSON output, the live
bar on a pseudo-terminal and plain lines elsewhere, exit statuses, and bad input."""

from __future__ import annotations

import json
import os
import pty
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from async_helpers import HANDLERS, start_gateway, wait_until, write_config
from conftest import MODELMUX, Proc

API = "rec"
ENV = {k: v for k, v in os.environ.items() if k != "MODELMUX_ADDRESS"} | {"COLUMNS": "160"}


def start_recorder_gateway(root: Path) -> Proc:
    """A gateway serving one BatchAPI, ``rec``: the batch recorder handler, embedded store."""
    api = {
        "name": API,
        "kind": "BatchAPI",
        "handler": {
            "type": "python",
            "path": str(HANDLERS / "batch_recorder.py"),
            "config": {"log": str(root / "runs.jsonl"), "nested": {"a": 1, "b": 2}},
        },
        "batch": {"visibility_timeout": "5s"},
    }
    return start_gateway(write_config(root / "modelmux.yaml", [api]))


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    proc = start_recorder_gateway(tmp_path_factory.mktemp("jobcli"))
    yield proc
    proc.stop()


def job(
    gateway: Proc, *args: str, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``modelmux job ARGS --address <gateway>``, to its end."""
    return subprocess.run(
        [*MODELMUX, "job", *args, "--address", gateway.address],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=ENV,
    )


def as_json(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def items_file(tmp_path: Path, items: list[Any]) -> str:
    path = tmp_path / "items.json"
    path.write_text(json.dumps(items))
    return str(path)


def test_submit_watch_failures_then_failed_get_and_list(gateway: Proc, tmp_path: Path) -> None:
    items: list[Any] = [{"n": i} for i in range(12)]
    items[7] = {"fail": "seven"}
    done = job(
        gateway,
        "submit",
        "--api",
        API,
        "--workers",
        "2",
        "--items",
        items_file(tmp_path, items),
        "--batch-size",
        "3",
        "--watch",
    )
    assert done.returncode == 1, done.stderr  # the job did not succeed
    lines = done.stdout.splitlines()
    job_id = lines[0].split()[1]
    assert all(line.startswith(f"job {job_id} ") for line in lines[:-1]), lines
    assert "COMPLETED_WITH_FAILURES: 4/4 batches, 1 failed, 0 running" in done.stdout
    assert "3/4 batches succeeded, 1 failed; completion hook SUCCEEDED" in done.stdout
    assert lines[-1] == f"failed batches and their items: modelmux job failed {job_id}"
    (failed,) = as_json(job(gateway, "failed", job_id, "--json"))
    assert failed["index"] == 2 and failed["attempts"] == 1 and not failed["dead_lettered"]
    assert failed["items"] == [{"n": 6}, {"fail": "seven"}, {"n": 8}]
    assert failed["error"] == "ValueError: asked to fail: seven"
    text = job(gateway, "failed", job_id).stdout
    assert f"batch 2 {failed['batch_id']}: 1 runs: ValueError: asked to fail: seven" in text
    got = as_json(job(gateway, "get", job_id, "--json", "--api", API))
    assert (got["status"], got["item_count"], got["batches_failed"]) == (
        "COMPLETED_WITH_FAILURES",
        12,
        1,
    )
    listed = as_json(job(gateway, "list", "--json", "--status", "COMPLETED_WITH_FAILURES"))
    assert job_id in [j["job_id"] for j in listed]
    assert {j["status"] for j in listed} == {"COMPLETED_WITH_FAILURES"}
    table = job(gateway, "list", "--api", API).stdout.splitlines()
    assert table[0].split() == ["JOB", "API", "STATUS", "BATCHES", "FAILED", "STARTED"]
    assert any(
        row.split()[:5] == [job_id, API, "COMPLETED_WITH_FAILURES", "4/4", "1"] for row in table
    )


def test_submit_prints_the_id_then_get_watch_and_json_watch(gateway: Proc, tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text("nested:\n  b: 3\nextra: [1, 2]\n")
    done = job(
        gateway,
        "submit",
        "--api",
        API,
        "--workers",
        "1",
        "--items",
        items_file(tmp_path, [1, "two", [3], None]),
        "--batch-size",
        "2",
        "--config",
        str(config),
        "--dead-letter",
        "2",
        "--timeout",
        "10m",
    )
    assert done.returncode == 0, done.stderr
    job_id, said = done.stdout.splitlines()
    assert said.startswith(f"submitted to {API} (ENQUEUING): 1 workers, item_list, batch size 2")
    watched = job(gateway, "get", job_id, "--watch", "--json")
    assert watched.returncode == 0, watched.stderr
    updates = [json.loads(line) for line in watched.stdout.splitlines()]
    assert updates[-1]["status"] == "SUCCEEDED" and updates[-1]["batches_succeeded"] == 2
    done_counts = [u["batches_succeeded"] + u["batches_failed"] for u in updates]
    assert done_counts == sorted(done_counts)
    final = updates[-1]
    assert final["config"] == {"nested": {"b": 3}, "extra": [1, 2]}
    assert (final["max_receive_count"], final["timeout"]) == (2, 600.0)
    again = job(gateway, "get", job_id, "--watch")  # a job that has ended: its summary, exit 0
    assert again.returncode == 0 and "SUCCEEDED" in again.stdout.splitlines()[-1], again.stdout
    shown = job(gateway, "get", job_id).stdout
    assert "status:      SUCCEEDED" in shown and "dead letter: after 2 runs" in shown


def test_files_and_ndjson_dry_runs_filter_and_resolve_local_paths(
    gateway: Proc, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    for name in ("a.ndjson", "b.ndjson", "sub/c.ndjson"):
        (data / name).write_text('{"x": 1}\n\n{"x": 2}\n')
    (data / "notes.txt").write_text("not an item\n")
    dry = as_json(
        job(
            gateway,
            "submit",
            "--api",
            API,
            "--workers",
            "1",
            "--ndjson",
            "data",  # relative to the command's folder
            "--include",
            "*.ndjson",
            "--exclude",
            "*/sub/*",
            "--batch-size",
            "3",
            "--dry-run",
            "--json",
            cwd=tmp_path,
        )
    )
    assert dry == {
        "files": [str(data / "a.ndjson"), str(data / "b.ndjson")],
        "file_count": 2,
        "item_count": 4,
        "total_batch_count": 2,
    }
    text = job(gateway, "submit", "--api", API, "--workers", "1", "--files", str(data), "--dry-run")
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[-1] == (
        "dry run: 4 files, 4 items, 4 batches; nothing was started"
    )
    listed = as_json(job(gateway, "list", "--json", "--limit", "1000"))
    assert not any(j["source"] == "delimited_files" for j in listed)  # a dry run starts nothing


def test_files_job_runs_every_file(gateway: Proc, tmp_path: Path) -> None:
    for i in range(5):
        (tmp_path / f"f{i}.bin").write_bytes(b"x")
    done = job(
        gateway, "submit", "--api", API, "--workers", "2", "--files", str(tmp_path), "--watch"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCEEDED" in done.stdout.splitlines()[-1]
    assert ": 5/5 batches succeeded, 0 failed; completion hook SUCCEEDED" in done.stdout


def test_stop_ends_a_watched_job_stopped(gateway: Proc, tmp_path: Path) -> None:
    items = items_file(tmp_path, [{"delay": 2} for _ in range(20)])
    submitted = job(gateway, "submit", "--api", API, "--workers", "1", "--items", items)
    job_id = submitted.stdout.split()[0]
    watcher = subprocess.Popen(
        [*MODELMUX, "job", "get", job_id, "--watch", "--address", gateway.address],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        wait_until(
            lambda: as_json(job(gateway, "get", job_id, "--json"))["status"] == "RUNNING",
            timeout=60,
            what="the job to run",
        )
        stopped = as_json(job(gateway, "stop", job_id, "--json"))
        assert stopped["status"] == "STOPPED"
        out, err = watcher.communicate(timeout=60)
    finally:
        watcher.kill()
    assert watcher.returncode == 1, err
    assert out.splitlines()[-1].startswith(f"job {job_id} STOPPED"), out
    again = job(gateway, "stop", job_id)
    assert again.returncode == 3
    assert "FAILED_PRECONDITION" in again.stderr and "already ended" in again.stderr


def test_timeout_ends_the_job_timed_out(gateway: Proc, tmp_path: Path) -> None:
    items = items_file(tmp_path, [{"delay": 5} for _ in range(4)])
    done = job(
        gateway,
        *("submit", "--api", API, "--workers", "1", "--items", items),
        *("--timeout", "1500ms", "--watch"),
    )
    assert done.returncode == 1, done.stderr
    assert f"job {done.stdout.split()[1]} TIMED_OUT" in done.stdout.splitlines()[-2], done.stdout


def read_some(fd: int) -> bytes:
    """What a pseudo-terminal's other end wrote; b"" once it has closed (Linux raises EIO)."""
    try:
        return os.read(fd, 65536)
    except OSError:
        return b""


def test_watch_on_a_terminal_draws_a_live_bar(gateway: Proc, tmp_path: Path) -> None:
    items = items_file(tmp_path, [{"delay": 0.2} for _ in range(8)])
    primary, secondary = pty.openpty()
    errors = tmp_path / "stderr"
    with errors.open("w") as stderr:
        proc = subprocess.Popen(
            [
                *MODELMUX,
                "job",
                "submit",
                "--api",
                API,
                "--workers",
                "2",
                "--items",
                items,
                "--watch",
                "--address",
                gateway.address,
            ],
            stdin=subprocess.DEVNULL,
            stdout=secondary,
            stderr=stderr,
            env={**ENV, "TERM": "xterm-256color"},
        )
    os.close(secondary)
    screen = b""
    try:
        while chunk := read_some(primary):
            screen += chunk
        assert proc.wait(60) == 0, errors.read_text()
    finally:
        proc.kill()
        os.close(primary)
    text = screen.decode(errors="replace")
    assert "\x1b[" in text  # a redrawn terminal line, not plain lines
    assert "8/8 batches" in text and "0 failed" in text and "ETA" in text
    assert "━" in text  # rich's bar
    assert "SUCCEEDED" in text.splitlines()[-1]


@pytest.mark.parametrize(
    ("args", "code", "said"),
    [
        (["submit", "--api", "nope", "--workers", "1", "--items", "{items}"], 3, "NOT_FOUND"),
        (["submit", "--api", API, "--workers", "0", "--items", "{items}"], 3, "INVALID_ARGUMENT"),
        (
            ["submit", "--api", API, "--workers", "1", "--items", "{items}", "--batch-size", "0"],
            3,
            "INVALID_ARGUMENT",
        ),
        (["submit", "--api", API, "--workers", "1", "--files", "/no/such/folder"], 3, "NOT_FOUND"),
        (["submit", "--api", API, "--workers", "1", "--items", "{bad}"], 2, "not JSON"),
        (
            ["submit", "--api", API, "--workers", "1", "--items", "{object}"],
            2,
            "expected a JSON array of items, got dict",
        ),
        (
            ["submit", "--api", API, "--workers", "1", "--items", "/no/such.json"],
            2,
            "cannot read /no/such.json",
        ),
        (
            ["submit", "--api", API, "--workers", "1", "--items", "{items}", "--include", "*.x"],
            2,
            "--include and --exclude filter --files or --ndjson",
        ),
        (
            ["submit", "--api", API, "--workers", "1", "--items", "{items}", "--timeout", "soon"],
            2,
            "--timeout: 'soon' is not a duration",
        ),
        (
            ["submit", "--api", API, "--workers", "1", "--items", "{items}", "--config", "{items}"],
            2,
            "--config {items}: expected a mapping, got list",
        ),
        (["submit", "--api", API, "--workers", "1"], 2, "one of the arguments --items --files"),
        (
            ["submit", "--api", API, "--workers", "1", "--items", "{items}", "--files", "/tmp"],
            2,
            "not allowed with argument",
        ),
        (["get", "no-such-job"], 3, "NOT_FOUND: no job 'no-such-job'"),
        (["failed", "no-such-job"], 3, "NOT_FOUND"),
        (["list", "--status", "DONE"], 2, "invalid choice: 'DONE'"),
    ],
)
def test_bad_input_exit_status_and_message(
    gateway: Proc, tmp_path: Path, args: list[str], code: int, said: str
) -> None:
    files = {"items": items_file(tmp_path, [1]), "bad": str(tmp_path / "bad.json")}
    (tmp_path / "bad.json").write_text("[1,")
    files["object"] = str(tmp_path / "object.json")
    (tmp_path / "object.json").write_text('{"a": 1}')
    args = [a.format(**files) for a in args]
    done = job(gateway, *args)
    assert done.returncode == code, (done.stdout, done.stderr)
    assert said.format(**files) in done.stderr, done.stderr
    assert done.stdout == ""


def test_an_unreachable_gateway_is_exit_3_unavailable(tmp_path: Path) -> None:
    done = subprocess.run(
        [*MODELMUX, "job", "list", "--address", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert done.returncode == 3 and "UNAVAILABLE" in done.stderr, done.stderr


def test_address_from_the_environment(gateway: Proc) -> None:
    done = subprocess.run(
        [*MODELMUX, "job", "list", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**ENV, "MODELMUX_ADDRESS": gateway.address},
    )
    assert done.returncode == 0 and isinstance(json.loads(done.stdout), list), done.stderr


def test_help_names_every_action() -> None:
    done = subprocess.run([*MODELMUX, "job", "--help"], capture_output=True, text=True, timeout=60)
    for action in ("submit", "get", "list", "stop", "failed"):
        assert f"    {action} " in done.stdout
    assert "exit status: 0 done" in done.stdout
