"""Closing a gRPC server's listeners and connections before grpc stops it, so no call is lost.

grpc core's server shutdown (``grpc.aio.Server.stop``) cancels every call it has accepted but not
yet handed to a handler, and every call that arrives before the client has read the GOAWAY it
sends: such a caller gets CANCELLED, although the server never ran the call (grpc/grpc#41785).
Under steady load a few calls are always in that window. grpcio has no API to stop accepting, or
to send GOAWAY, while the server keeps serving; so a server that has drained its calls (answering
new ones UNAVAILABLE itself) first takes its own sockets away from grpc:

1. each listening socket's descriptor is replaced by a fresh unbound socket (``dup2``): the
   listener is closed, new connections are refused, and grpc's acceptor, which no longer gets
   events for it, stays quiet;
2. each connection accepted on it is half-closed (``shutdown(SHUT_WR)``): the peer reads every
   reply already written, then the end of the stream, and fails the calls it still has open on
   that connection with UNAVAILABLE (as it fails calls it starts afterwards: the connection is
   refused), never CANCELLED. TCP connections are waited for until the peer acknowledged
   everything sent (the socket left FIN_WAIT1), so no reply is lost when grpc closes them.

After that ``stop`` finds nothing to cancel. Linux only (``/proc``); elsewhere nothing is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass

from modelmux_common.listen import TCP_LISTEN, UNIX_LISTENING, split

# TCP states (include/net/tcp_states.h) in which our FIN, and so some data before it, is unacked
_UNACKED = {"01", "04", "09", "0B"}  # ESTABLISHED, FIN_WAIT1, LAST_ACK, CLOSING


@dataclass(frozen=True, slots=True)
class _Socket:
    fd: int
    inode: int
    family: socket.AddressFamily
    listening: bool


def _tcp_table(ports: set[int]) -> dict[int, tuple[socket.AddressFamily, str]]:
    """inode -> (family, state) of the TCP sockets whose local port is one of ``ports``."""
    found: dict[int, tuple[socket.AddressFamily, str]] = {}
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            with open(f"/proc/net/{name}", encoding="ascii") as fh:
                rows = fh.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if int(fields[1].rsplit(":", 1)[1], 16) in ports and fields[9] != "0":
                found[int(fields[9])] = (family, fields[3])
    return found


def _unix_table(paths: set[str]) -> dict[int, bool]:
    """inode -> listening, for the unix sockets bound to (or accepted on) one of ``paths``."""
    found: dict[int, bool] = {}
    try:
        with open("/proc/net/unix", encoding="utf-8", errors="replace") as fh:
            rows = fh.read().splitlines()[1:]
    except OSError:
        return found
    for row in rows:
        fields = row.split(maxsplit=7)
        if len(fields) == 8 and fields[7] in paths:
            found[int(fields[6])] = bool(int(fields[3], 16) & UNIX_LISTENING)
    return found


def _targets(addresses: Iterable[str]) -> tuple[set[int], set[str]]:
    """The TCP ports and unix socket paths of ``addresses`` (host:port, [v6]:port, unix:path)."""
    ports: set[int] = set()
    paths: set[str] = set()
    for address in addresses:
        if address.startswith("unix:"):
            path = address.removeprefix("unix:").removeprefix("//")
            paths.update((path, os.path.abspath(path)))  # /proc shows it as it was bound
        else:
            ports.add(split(address)[1])
    return ports, paths


def _own_sockets(ports: set[int], paths: set[str]) -> list[_Socket]:
    """This process's sockets listening on, or accepted on, those ports and paths."""
    tcp = _tcp_table(ports) if ports else {}
    unix = _unix_table(paths) if paths else {}
    out: list[_Socket] = []
    if not tcp and not unix:
        return out
    for entry in os.scandir("/proc/self/fd"):
        try:
            link = os.readlink(entry.path)
        except OSError:
            continue
        if not link.startswith("socket:["):
            continue
        inode = int(link[8:-1])
        if inode in tcp:
            family, state = tcp[inode]
            out.append(_Socket(int(entry.name), inode, family, state == TCP_LISTEN))
        elif inode in unix:
            out.append(_Socket(int(entry.name), inode, socket.AF_UNIX, unix[inode]))
    return out


def _retire(listener: _Socket) -> None:
    placeholder = socket.socket(listener.family, socket.SOCK_STREAM)
    try:
        os.dup2(placeholder.fileno(), listener.fd)
    finally:
        placeholder.close()


def _half_close(connection: _Socket) -> None:
    with contextlib.suppress(OSError):  # already gone
        sock = socket.socket(fileno=os.dup(connection.fd))
        try:
            sock.shutdown(socket.SHUT_WR)
        finally:
            sock.close()


async def close_listeners_and_connections(addresses: Iterable[str], *, timeout: float) -> int:
    """Steps 1 and 2 above for a server bound to ``addresses``; returns the connections closed.
    Waits at most ``timeout`` seconds for TCP peers to acknowledge what was sent to them."""
    ports, paths = _targets(addresses)
    for listener in [s for s in _own_sockets(ports, paths) if s.listening]:
        _retire(listener)
    # listed after the listeners are gone: no connection can be accepted after this
    connections = [s for s in _own_sockets(ports, paths) if not s.listening]
    for connection in connections:
        _half_close(connection)
    tcp = {c.inode for c in connections if c.family != socket.AF_UNIX}
    deadline = time.monotonic() + timeout
    while tcp and time.monotonic() < deadline:
        table = _tcp_table(ports)
        tcp = {i for i in tcp if i in table and table[i][1] in _UNACKED}
        if tcp:
            await asyncio.sleep(0.005)
    return len(connections)
