"""Child processes that die with their parent: how ``modelmux up``, ``gateway --workers N`` and the
gateway's handler worker pool start, signal and stop theirs.

A child started here (:func:`spawn`, or :class:`AsyncChild` from an event loop)

- runs in a session of its own, so a terminal's Ctrl-C reaches only the parent, which stops its
  children in the order it chooses (``up``: the gateway first, so it drains before its backends);
- gets as its stdin a pipe whose other end only the parent holds, and calls :func:`watch_parent`
  first thing: when the pipe reaches end-of-file, the parent is gone, however it died (SIGKILL and
  the OOM killer included), and the child sends itself SIGTERM (its usual orderly stop) and exits
  after :data:`ORPHAN_GRACE` seconds if that stop has not finished by then.

Why a pipe and not Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG)``): that signal fires
when the *thread* that forked the child exits, not the process, so a child spawned from a
short-lived thread (``asyncio.to_thread``, an executor, a test running a gateway on a thread) is
killed while its parent lives on; it is lost across a set-uid exec; it is Linux-only; and it gives
one signal with no deadline (SIGKILL leaves runtime folders and sockets behind; SIGTERM has no
backstop if the stop hangs). The kernel closes a process's pipe ends however it ends, whichever
thread spawned the child, and the child then decides how to stop, within a bound.

Children are started with :class:`subprocess.Popen` from the calling thread in both faces: on
Linux it uses vfork, which is cheaper for a large parent and runs no ``pthread_atfork`` handlers
(gRPC's print "skipping fork() handlers" when a process with busy gRPC threads forks).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence

# Set in a child's environment by spawn(): watch_parent() then watches stdin (and removes it, so
# the child's own children do not inherit it).
SUPERVISED = "MODELMUX_SUPERVISED"
# How long an orphaned child's orderly stop may take before it exits regardless.
ORPHAN_GRACE = 3.0


def spawn(
    argv: Sequence[str], *, env: Mapping[str, str] | None = None, stdout: int | None = None
) -> subprocess.Popen[bytes]:
    """Starts a child that dies with this process (the child must call :func:`watch_parent`)."""
    return subprocess.Popen(
        list(argv),
        stdin=subprocess.PIPE,  # never written: its end-of-file tells the child we are gone
        stdout=stdout,
        start_new_session=True,
        env={**os.environ, **(env or {}), SUPERVISED: "1"},
    )


def watch_parent(*, grace: float = ORPHAN_GRACE) -> None:
    """In a child started by :func:`spawn`: stops this process once its parent is gone.

    Does nothing in a process started otherwise (stdin is then the user's, not a pipe to watch).
    """
    if os.environ.pop(SUPERVISED, None) is None:
        return
    watched = os.dup(0)  # not inherited by this process's own children
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # nothing else reads the pipe
    os.close(null)

    def watch() -> None:
        with contextlib.suppress(OSError):
            while os.read(watched, 512):
                pass
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def stop(children: Sequence[subprocess.Popen[bytes]], *, grace: float) -> None:
    """SIGTERM to every child still running, then SIGKILL to those still running after ``grace``."""
    for child in children:
        if child.poll() is None:
            child.terminate()
    deadline = time.monotonic() + grace
    for child in children:
        try:
            child.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        _close_stdin(child)


def _close_stdin(child: subprocess.Popen[bytes]) -> None:
    """Once a child has exited (closing it earlier would tell the child to stop)."""
    if child.stdin is not None:
        child.stdin.close()


def forward_signals(
    children: Sequence[subprocess.Popen[bytes]],
    *,
    grace: float,
    signals: Sequence[signal.Signals] = (signal.SIGINT, signal.SIGTERM),
) -> None:
    """Passes ``signals`` on to the children (a second one too: it forces their stop); SIGKILL to
    those still running ``grace`` seconds after the first."""
    killer: list[threading.Timer] = []

    def kill_rest() -> None:
        for child in children:
            if child.poll() is None:
                child.kill()

    def forward(signum: int, _: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)
        if not killer:
            killer.append(threading.Timer(grace, kill_rest))
            killer[0].daemon = True
            killer[0].start()

    for signum in signals:
        signal.signal(signum, forward)


class AsyncChild:
    """A child started by :func:`spawn`, seen from an event loop: its exit is awaited without a
    thread (a pidfd the loop watches; polling where there is none)."""

    def __init__(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, stdout: bool = False
    ) -> None:
        self.popen = spawn(argv, env=env, stdout=subprocess.PIPE if stdout else None)
        self.pid = self.popen.pid
        loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int] = loop.create_future()
        self._poller: asyncio.Task[None] | None = None
        try:
            pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):  # not Linux 5.3 or later
            self._poller = loop.create_task(self._poll())
        else:
            loop.add_reader(pidfd, self._on_exit, loop, pidfd)

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def _on_exit(self, loop: asyncio.AbstractEventLoop, pidfd: int) -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        self._exit(self.popen.wait())

    async def _poll(self) -> None:
        while self.popen.poll() is None:  # noqa: ASYNC110 (nothing to wait on without a pidfd)
            await asyncio.sleep(0.1)
        self._exit(self.popen.wait())

    def _exit(self, code: int) -> None:
        _close_stdin(self.popen)
        if not self._exited.done():
            self._exited.set_result(code)

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    async def readline(self) -> bytes:
        """The first line the child writes on its stdout (``stdout=True``); the pipe is closed
        after it."""
        assert self.popen.stdout is not None
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), self.popen.stdout
        )
        try:
            return await reader.readline()
        finally:
            transport.close()

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:  # not a pid that may have been reused since
            self.popen.send_signal(signum)

    async def stop(self, *, grace: float) -> int:
        """SIGTERM, then SIGKILL if it is still running after ``grace`` seconds."""
        self.signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.wait(), grace)
        except TimeoutError:
            self.signal(signal.SIGKILL)
            return await self.wait()
