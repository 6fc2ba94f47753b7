"""Process and port hygiene: a busy address fails loudly and the first server keeps it alone;
nothing ``modelmux up`` or a gateway starts outlives it, SIGKILL included; ``make run``'s terminal
shows no TensorFlow or gRPC C++ lines."""

from __future__ import annotations

import contextlib
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from conftest import MODELMUX, ROOT, Proc, start_daemon
from gateway_helpers import wait_serving, write_config
from modelsync_helpers import free_port
from test_examples import quickstart_config

from modelmux_common.grpcutil import bind
from modelmux_common.listen import ListenError, server_options
from modelmux_common.logs import COMPONENT_WIDTH

# What TensorFlow's and gRPC's C++ logging writes: "I0000 00:00:1796223555.543744  14335 port.cc:153]",
# "I1202 14:59:15.133968   14337 fork_posix.cc:71]", absl's "WARNING: All log messages before ...".
CXX_LINE = re.compile(r"^(?:[IWEF]\d{4} [\d:.]+ +\d+ [\w./-]+:\d+\]|WARNING: All log messages)")
# A console log line: timestamp, level, the component column, the event.
CONSOLE_LINE = re.compile(
    rf"^\d{{4}}-\d\d-\d\dT[\d:.]+Z \[(\w+) *\] (.{{{COMPONENT_WIDTH}}}) (\S+)"
)


# --- helpers -----------------------------------------------------------------------------------


def listeners(port: int) -> int:
    """How many sockets listen on ``port`` (any address), from /proc/net/tcp and tcp6."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split():
                found += [int(child), *descendants(int(child))]
    return found


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its new parent to reap it counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def answers(address: str) -> bool:
    """Something accepts a connection at ``address`` (host:port or unix:path)."""
    if address.startswith("unix:"):
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(address.removeprefix("unix:"))
                return True
            except OSError:
                return False
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port_of(address)), 1):
        return True
    return False


def wait_gone(pids: list[int], addresses: list[str], *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        running = [p for p in pids if alive(p)]
        open_ = [a for a in addresses if answers(a)]
        if not running and not open_:
            return
        assert time.monotonic() < deadline, (
            f"still alive after {timeout} s: {[(p, _command(p)) for p in running]}; "
            f"still answering: {open_}"
        )
        time.sleep(0.05)


def _command(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    return "?"


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MODELMUX, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def refused(done: subprocess.CompletedProcess[str], address: str, holder: int) -> None:
    """Exit 1 and one line on stderr naming the address and the process that holds it."""
    assert done.returncode == 1, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert f"cannot listen on {address}: the address is in use by pid {holder} (" in lines[0]


def echo_handler_config(path: Path, *, workers: int = 2) -> Path:
    """A gateway with one Python handler API in ``workers`` worker processes, nothing else."""
    handler = path.parent / "echo.py"
    handler.write_text(
        "class Handler:\n"
        "    def __init__(self, config):\n"
        "        pass\n\n"
        "    def handle_post(self, payload):\n"
        "        return payload\n"
    )
    doc = {
        "gateway": {"listen": "127.0.0.1:0", "shutdown_grace": "1s"},
        "apis": [
            {
                "name": "echo",
                "handler": {
                    "type": "python",
                    "path": str(handler),
                    "processes_per_replica": workers,
                },
            }
        ],
    }
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def gateway_config(tmp_path: Path, example_models: Path, backend: Proc) -> Path:
    return write_config(
        tmp_path / "modelmux.yaml",
        models=example_models,
        backends=[{"name": "cpu-0", "address": backend.address}],
    )


@pytest.fixture
def sync_config(tmp_path: Path, example_models: Path) -> Path:
    config = tmp_path / "sync.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "gateway": {"modelsync": "127.0.0.1:1"},
                "modelsync": {"listen": "127.0.0.1:0", "target": str(tmp_path / "volume")},
                "apis": [
                    {
                        "name": "half-plus-two",
                        "handler": {"models": {"path": str(example_models / "half_plus_two")}},
                    }
                ],
            }
        )
    )
    return config


# --- a busy address ----------------------------------------------------------------------------


@pytest.fixture
def configs(gateway_config: Path, sync_config: Path) -> dict[str, str]:
    return {"gateway": str(gateway_config), "sync": str(sync_config)}


@pytest.mark.parametrize("command", ["gateway", "sync"])
def test_second_server_on_a_busy_port_exits_1_and_the_first_keeps_it(
    configs: dict[str, str], command: str
) -> None:
    first = start_daemon([command, "--config", configs[command]])
    try:
        done = run(command, "--config", configs[command], "--listen", first.address)
        refused(done, first.address, first.pid)
        assert listeners(port_of(first.address)) == 1
        wait_serving(first.address, timeout=10)
    finally:
        assert first.stop() == 0


def test_second_backend_on_a_busy_port_exits_1_and_the_first_keeps_it(backend: Proc) -> None:
    done = run("backend", "--listen", backend.address)
    refused(done, backend.address, backend.pid)
    assert listeners(port_of(backend.address)) == 1
    wait_serving(backend.address, timeout=10)


@pytest.mark.parametrize("command", ["gateway", "sync"])
def test_a_unix_socket_a_live_server_holds_is_not_taken_over(
    tmp_path: Path, configs: dict[str, str], command: str
) -> None:
    address = f"unix:{tmp_path / 'served.sock'}"
    first = start_daemon([command, "--config", configs[command], "--listen", address])
    try:
        done = run(command, "--config", configs[command], "--listen", address)
        refused(done, address, first.pid)
        wait_serving(address, timeout=10)  # the path was not unlinked and taken over
    finally:
        assert first.stop() == 0


def test_a_stale_unix_socket_file_is_replaced(tmp_path: Path, gateway_config: Path) -> None:
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as left:  # bound, closed, never unlinked: nobody listens
        left.bind(str(path))
    gateway = start_daemon(["gateway", "--config", str(gateway_config), "--listen", f"unix:{path}"])
    try:
        wait_serving(f"unix:{path}", timeout=30)
    finally:
        assert gateway.stop() == 0


async def test_bind_refuses_a_unix_socket_of_a_live_server_in_this_process(
    tmp_path: Path,
) -> None:
    """The check the handler workers' and the gateway's own sockets go through."""
    address = f"unix:{tmp_path / 'h0-0.sock'}"
    first = grpc.aio.server(options=server_options())
    bind(first, address)
    await first.start()
    try:
        second = grpc.server(futures.ThreadPoolExecutor(1), options=server_options())
        with pytest.raises(ListenError, match=f"in use by pid {os.getpid()} "):
            bind(second, address)
        assert answers(address)  # the path was not unlinked and taken over
    finally:
        await first.stop(0)


def test_workers_share_their_port_and_no_other_gateway_joins(gateway_config: Path) -> None:
    workers = start_daemon(["gateway", "--config", str(gateway_config), "--workers", "2"])
    try:
        wait_serving(workers.address)
        port = port_of(workers.address)
        deadline = time.monotonic() + 30
        while listeners(port) < 2:  # the second worker may still be starting
            assert time.monotonic() < deadline, "the two workers never shared the port"
            time.sleep(0.1)
        for extra in ([], ["--workers", "2"]):
            done = run(
                "gateway", "--config", str(gateway_config), "--listen", workers.address, *extra
            )
            assert done.returncode == 1, done.stderr[-3000:]
            assert (
                f"cannot listen on {workers.address}: the address is in use by pid" in done.stderr
            )
        assert listeners(port) == 2
    finally:
        assert workers.stop() == 0


@pytest.mark.parametrize("reuse_port", [False, True])
def test_workers_refuse_a_port_an_unrelated_process_holds(
    gateway_config: Path, reuse_port: bool
) -> None:
    """Even one that set SO_REUSEPORT, which the kernel would let the workers share."""
    with socket.socket() as holder:
        if reuse_port:
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        address = f"127.0.0.1:{holder.getsockname()[1]}"
        done = run(
            "gateway", "--config", str(gateway_config), "--listen", address, "--workers", "2"
        )
        refused(done, address, os.getpid())
        assert listeners(port_of(address)) == 1


# --- nothing outlives its parent ---------------------------------------------------------------


@pytest.fixture
def up_config(tmp_path: Path, example_models: Path) -> Iterator[Path]:
    """The quickstart config (examples/quickstart/modelmux.yaml) on free loopback ports."""
    ports = [free_port() for _ in range(3)]
    config = quickstart_config(tmp_path, example_models, f"127.0.0.1:{ports[0]}")
    doc = yaml.safe_load(config.read_text())
    doc["modelsync"]["listen"] = doc["gateway"]["modelsync"] = f"127.0.0.1:{ports[1]}"
    doc["gateway"]["listen"] = f"127.0.0.1:{ports[2]}"
    config.write_text(yaml.safe_dump(doc))
    yield config


def addresses(config: Path) -> list[str]:
    doc = yaml.safe_load(config.read_text())
    return [doc["gateway"]["listen"], doc["modelsync"]["listen"], doc["backends"][0]["address"]]


def test_sigkill_of_up_stops_everything_it_started(tmp_path: Path, up_config: Path) -> None:
    log = (tmp_path / "up.log").open("w")
    up = subprocess.Popen(
        [*MODELMUX, "up", "--config", str(up_config)],
        stdout=subprocess.DEVNULL,
        stderr=log,
        cwd=ROOT,
        env={**os.environ, "MODELMUX_LOG_FORMAT": "json"},
    )
    stack: list[int] = []
    try:
        wait_serving(addresses(up_config)[0])
        stack = descendants(up.pid)
        # backend, modelsync, gateway and the gateway's five handler workers (one per example API)
        assert len(stack) == 8, [_command(p) for p in stack]
        # a second `make run` beside it fails at once, naming every taken address and its holder
        started = time.monotonic()
        second = run("up", "--config", str(up_config), timeout=30)
        assert second.returncode == 1 and time.monotonic() - started < 5, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 3, lines
        for line, address in zip(lines, reversed(addresses(up_config)), strict=True):
            assert f"cannot listen on {address}: the address is in use by pid" in line, line
        assert sorted(descendants(up.pid)) == sorted(stack)  # the first stack is untouched
        up.kill()
        up.wait()
        wait_gone(stack, addresses(up_config), timeout=5)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        log.close()
        for pid in stack:  # what this test failed on, not to disturb the next ones
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_sigkill_of_a_gateway_stops_its_handler_workers(tmp_path: Path) -> None:
    gateway = start_daemon(
        ["gateway", "--config", str(echo_handler_config(tmp_path / "modelmux.yaml"))]
    )
    try:  # its "serving" line comes once the handler workers are ready
        wait_serving(gateway.address, timeout=10)  # health too, with no model to wait for
        workers = descendants(gateway.pid)
        assert len(workers) == 2, [_command(p) for p in workers]
        sockets = [
            f"unix:{path}"
            for pid in workers
            for path in re.findall(r"--socket (\S+)", _command(pid))
        ]
        assert len(sockets) == 2 and all(answers(s) for s in sockets)
        gateway.popen.kill()
        gateway.popen.wait()
        wait_gone(workers, sockets, timeout=5)
    finally:
        gateway.stop()


# --- make run's terminal -------------------------------------------------------------------------


def test_up_on_a_terminal_is_quiet_and_says_who_wrote_each_line(up_config: Path) -> None:
    """``make run`` as a user sees it: a pseudo-terminal, console logs, then Ctrl-C."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: modelmux up on the terminal
        os.chdir(ROOT)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_CPP", "MODELMUX_LOG"))}
        os.execve(sys.executable, [*MODELMUX, "up", "--config", str(up_config)], env)
    output = b""

    def read_until(marker: bytes, timeout: float) -> None:
        nonlocal output
        deadline = time.monotonic() + timeout
        while marker not in output:
            assert time.monotonic() < deadline, output.decode(errors="replace")[-4000:]
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # EIO: every process on the terminal has closed it
                    chunk = b""
                if not chunk:
                    return
                output += chunk

    try:
        read_until(b"Ctrl-C stops everything.", 120)
        os.write(fd, b"\x03")  # Ctrl-C, as the terminal delivers it: SIGINT to up alone
        read_until(b"\x00never", 60)  # until every process has let go of the terminal
        _, status = os.waitpid(pid, 0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    text = re.sub(r"\x1b\[[0-9;]*m", "", output.decode(errors="replace")).replace("\r\n", "\n")
    lines = [line for line in text.splitlines() if line.strip()]
    assert not [line for line in lines if CXX_LINE.match(line)], text
    assert "backend_unreachable" not in text and "fork()" not in text, text
    logged = [CONSOLE_LINE.match(line) for line in lines if re.match(r"^\d{4}-\d\d-\d\dT", line)]
    assert logged and all(logged), [line for line in lines if not CONSOLE_LINE.match(line)]
    components = {m.group(2).strip() for m in logged if m}
    assert components == {"backend cpu-0", "modelsync", "gateway", "handler"}, components
    # the last start-up line: the banner's state and every address, findable after the scroll
    startup = text.split("Ctrl-C stops everything.")[0].splitlines()[-1]
    assert startup.startswith("modelmux up: SERVING (")
    assert all(address in startup for address in addresses(up_config))
    others = [line for line in lines if not CONSOLE_LINE.match(line)]
    assert all(not line.startswith(("Traceback", "E0", "W0", "I0")) for line in others), others
    # Ctrl-C kept its order: the gateway drained and stopped before its backend
    stopped = [m.group(2).strip() for m in logged if m and m.group(3) == "stopped"]
    assert stopped[0] == "gateway" and stopped[-1] == "backend cpu-0", stopped
