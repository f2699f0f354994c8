"""Socket helpers of serve: its endpoints' links and its control socket.

Plain functions on the standard library's sockets, shared so that neither
user needs the other: unix socket paths left behind by a process that died,
how a peer is named in messages, and who the peer of a unix socket is.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import struct

from .endpoints import Endpoint


def addr_text(addr) -> str:
    """'127.0.0.1:9000', '[::1]:9000', or a unix peer's (usually empty) name."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = addr[0]
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr) if addr else ""


def peer_name(sock, ep: Endpoint) -> str:
    """How a connected client endpoint's peer is named in messages."""
    if ep.kind == "unix":
        return ep.path
    with contextlib.suppress(OSError):
        return addr_text(sock.getpeername())
    return str(ep)


def remove_stale_socket(path: str) -> None:
    """A unix socket left behind by a process that died: remove it, unless
    something still listens there (then bind fails with a clear error)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
    except OSError:
        pass
    else:
        raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
    finally:
        probe.close()


def listening_socket(ep: Endpoint) -> socket.socket:
    """A non-blocking socket listening on a server endpoint (a unix socket
    left behind by a process that died is replaced); OSError when the
    address cannot be had."""
    if ep.kind == "unix":
        remove_stale_socket(ep.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        family = socket.AF_INET6 if ":" in ep.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if ep.kind != "unix":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(ep.address)
        sock.listen(4)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def client_socket(ep: Endpoint) -> socket.socket:
    """A non-blocking socket of the family a client endpoint connects with."""
    family = socket.AF_UNIX if ep.kind == "unix" else (
        socket.AF_INET6 if ":" in ep.host else socket.AF_INET)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    return sock


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of a unix socket's peer (SO_PEERCRED); None when unknown."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid
