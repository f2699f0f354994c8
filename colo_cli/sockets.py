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
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = addr[0]
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr) if addr else ""


def peer_name(sock, ep: Endpoint) -> str:
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


def peer_uid(sock: socket.socket) -> int | None:
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid
