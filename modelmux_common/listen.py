"""A busy address fails loudly: the check every server makes before it binds, and who holds it.

gRPC's own bind would not refuse: it turns SO_REUSEPORT on unless told otherwise (so a second
server on a busy TCP port shares it and takes part of its connections), and it unlinks an existing
unix socket file before binding (so a second server takes the path over from a live one). So every
modelmux server binds with ``grpc.so_reuseport: 0`` (:func:`server_options`) and first calls
:func:`ensure_free`, which raises :class:`ListenError` naming the address and, when this user can
see it in /proc, the process that listens there.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import re
import socket
import struct

TCP_LISTEN = "0A"  # /proc/net/tcp's state of a listening socket
UNIX_LISTENING = 0x10000  # __SO_ACCEPTCON in /proc/net/unix's flags
_SOCKET_LINK = re.compile(r"socket:\[(\d+)\]")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class ListenError(Exception):
    """A server cannot listen on its address. The message is one line naming the address."""


def server_options(*, shared_port: bool = False) -> list[tuple[str, int]]:
    """Options of every modelmux gRPC server: SO_REUSEPORT only between the processes of one
    ``gateway --workers N`` (``shared_port``), off everywhere else."""
    return [("grpc.so_reuseport", int(shared_port))]


def ensure_free(address: str) -> None:
    """Raises :class:`ListenError` when ``address`` (host:port, [v6]:port or unix:path) is taken.

    A TCP address is probed with a bind of its own (SO_REUSEADDR like gRPC's listeners, so
    connections in TIME_WAIT do not count, and without SO_REUSEPORT, so a listener that set it
    counts). A unix socket file is taken when something accepts a connection on it; a stale file
    nobody listens on is left for gRPC to replace. Port 0 is always free.
    """
    if address.startswith("unix:"):
        _ensure_unix_free(address, address.removeprefix("unix:"))
        return
    host, port = split(address)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        raise ListenError(f"cannot listen on {address}: {exc}") from None
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ListenError(in_use(address)) from None
                raise ListenError(f"cannot listen on {address}: {exc.strerror}") from None


def _ensure_unix_free(address: str, path: str) -> None:
    if not os.path.exists(path):
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return  # a stale socket file: nobody listens on it
        except (BlockingIOError, TimeoutError):
            pass  # a full backlog: someone listens
        except OSError:
            return  # not a socket at all: gRPC's bind says so
    raise ListenError(in_use(address))


def split(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` as (host without brackets, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ListenError(f"cannot listen on {address}: not host:port, [v6]:port or unix:path")
    return host.strip("[]"), int(port)


def in_use(address: str) -> str:
    """The one-line message for a taken address, naming the processes that hold it if visible."""
    holders = ", ".join(f"pid {pid} ({command})" for pid, command in holders_of(address))
    return f"cannot listen on {address}: the address is in use by {holders or 'another process'}"


def holders_of(address: str, *, limit: int = 3) -> list[tuple[int, str]]:
    """Processes (pid, command line) with a socket listening on ``address``, as far as /proc shows
    them to this user; empty when none can be found."""
    try:
        inodes = (
            _unix_inodes(os.path.abspath(address.removeprefix("unix:")))
            if address.startswith("unix:")
            else _tcp_inodes(*split(address))
        )
    except (OSError, ListenError):
        return []
    found: list[tuple[int, str]] = []
    for pid in _pids_with_sockets(inodes):
        found.append((pid, _command(pid)))
        if len(found) == limit:
            break
    return found


def _tcp_inodes(host: str, port: int) -> set[str]:
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)
        wanted = {_plain(ipaddress.ip_address(str(info[4][0]))) for info in infos}
    except (OSError, ValueError):
        wanted = set()  # then any address with that port
    anywhere = not wanted or any(ip.is_unspecified for ip in wanted)
    listening: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                hex_ip, _, hex_port = local.partition(":")
                if state != TCP_LISTEN or int(hex_port, 16) != port:
                    continue
                ip = _proc_ip(hex_ip)
                if anywhere or ip in wanted or ip.is_unspecified:
                    listening.add(inode)
    return listening


def _proc_ip(hex_ip: str) -> IPAddress:
    """An address as /proc/net/tcp{,6} prints it: 32-bit words in the machine's byte order."""
    words = [int(hex_ip[i : i + 8], 16) for i in range(0, len(hex_ip), 8)]
    return _plain(ipaddress.ip_address(b"".join(struct.pack("=I", w) for w in words)))


def _plain(ip: IPAddress) -> IPAddress:
    """IPv4 for an IPv4-mapped IPv6 address (gRPC listens on 127.0.0.1 as [::ffff:127.0.0.1])."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _unix_inodes(path: str) -> set[str]:
    inodes: set[str] = set()
    with open("/proc/net/unix") as fh:
        for line in fh.readlines()[1:]:
            fields = line.split(maxsplit=7)
            listening = len(fields) == 8 and int(fields[3], 16) & UNIX_LISTENING
            if listening and fields[7].strip() == path:
                inodes.add(fields[6])
    return inodes


def _pids_with_sockets(inodes: set[str]) -> list[int]:
    if not inodes:
        return []
    pids: list[int] = []
    for entry in sorted(os.listdir("/proc"), key=lambda e: (len(e), e)):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):  # gone meanwhile, or another user's
            for fd in os.listdir(f"/proc/{entry}/fd"):
                with contextlib.suppress(OSError):
                    match = _SOCKET_LINK.fullmatch(os.readlink(f"/proc/{entry}/fd/{fd}"))
                    if match and match.group(1) in inodes:
                        pids.append(int(entry))
                        break
    return pids


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return "?"
    if not argv:
        return "?"
    text = " ".join([os.path.basename(argv[0]), *argv[1:]])
    return text if len(text) <= 160 else text[:157] + "..."
