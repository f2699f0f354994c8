"""The control socket of ``serve``: line-delimited JSON over a unix socket.

Requests are one JSON object per line, at most 64 KiB::

    {"cmd": "stats"}                      counters, histograms, links
    {"cmd": "connections", "limit": 50}   the connection table, most recent last
    {"cmd": "checkpoint"}                 perform a checkpoint now (flush)
    {"cmd": "version"}

and each gets one JSON line back: ``{"ok": true, ...}`` or
``{"ok": false, "error": "..."}``.

Only the socket's owner may use it: the socket file is created with mode
0600 (under a 0177 umask, so there is no window where it is wider), and every
connection's peer credentials (SO_PEERCRED) are checked against our uid
(root is allowed too).  A request that is not JSON gets an error reply (the
connection stays open); one larger than the bound gets an error and the
connection is closed.

The socket knows nothing of serve's insides: it is given three questions
to ask (:class:`ControlServer`'s ``stats``, ``connections`` and
``checkpoint``), and serve answers them.  The dependency runs one way:
serve uses this module, this module uses neither serve nor the core.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
from typing import Callable

from . import __version__
from .errors import ColoError, os_error_text
from .sockets import peer_uid, remove_stale_socket

LINE_MAX = 64 * 1024
PROTOCOL_VERSION = 1


#: the most connections one "connections" request lists
CONNECTIONS_MAX = 100_000


class ControlError(ColoError):
    """The control socket cannot be made (serve) or asked (``stats``):
    one line."""


class ControlServer:
    """The control socket at ``path``, answering with what it is given:

    * ``stats(top)``: ``{"stats": ..., "top_connections": ...}``, the
      counters and the ``top`` connections by miscompares and by hold time;
    * ``connections(limit)``: ``{"total": n, "connections": [...]}``, the
      ``limit`` most recent connections and how many there are;
    * ``checkpoint()``: perform one now; ``{"released": n, "discarded": n}``.
    """

    def __init__(self, path: str, *, stats: Callable[[int], dict],
                 connections: Callable[[int], dict], checkpoint: Callable[[], dict]) -> None:
        self.path = path
        self._stats = stats
        self._connections = connections
        self._checkpoint = checkpoint
        self._srv = None

    async def start(self) -> None:
        old = os.umask(0o177)
        try:
            remove_stale_socket(self.path)
            self._srv = await asyncio.start_unix_server(self._client, self.path, limit=LINE_MAX)
        except OSError as e:
            raise ControlError(f"--control {self.path}: cannot listen: {os_error_text(e)}") from None
        finally:
            os.umask(old)
        os.chmod(self.path, stat.S_IRUSR | stat.S_IWUSR)

    def close(self) -> None:
        if self._srv is not None:
            self._srv.close()
            self._srv = None
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        uid = peer_uid(sock) if sock is not None else None
        try:
            if uid is None or uid not in (os.geteuid(), 0):
                await self._reply(writer, {"ok": False, "error": "permission denied"})
                return
            while True:
                try:
                    line = await reader.readline()
                except (asyncio.LimitOverrunError, ValueError):
                    await self._reply(writer, {"ok": False,
                                               "error": f"request longer than {LINE_MAX} bytes"})
                    return
                if not line:
                    return
                if not line.strip():
                    continue
                await self._reply(writer, self.dispatch(line))
        except (ConnectionError, OSError):
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    @staticmethod
    async def _reply(writer, doc: dict) -> None:
        writer.write(json.dumps(doc, separators=(",", ":")).encode() + b"\n")
        await writer.drain()

    def dispatch(self, line: bytes) -> dict:
        try:
            req = json.loads(line)
        except ValueError:
            return {"ok": False, "error": "not JSON"}
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            return {"ok": False, "error": 'expected {"cmd": "..."}'}
        cmd = req["cmd"]
        if cmd == "stats":
            top = req.get("top", 10)
            if not isinstance(top, int) or not 0 <= top <= 1000:
                return {"ok": False, "error": "top must be an integer from 0 to 1000"}
            return {"ok": True, "protocol": PROTOCOL_VERSION, **self._stats(top)}
        if cmd == "connections":
            limit = req.get("limit", 100)
            if not isinstance(limit, int) or limit < 1:
                return {"ok": False, "error": "limit must be a positive integer"}
            return {"ok": True, **self._connections(min(limit, CONNECTIONS_MAX))}
        if cmd == "checkpoint":
            return {"ok": True, **self._checkpoint()}
        if cmd == "version":
            return {"ok": True, "version": __version__, "protocol": PROTOCOL_VERSION}
        return {"ok": False, "error": f"unknown command {cmd!r}"}


def query(path: str, request: dict, timeout_s: float = 5.0) -> dict:
    """Send one request to a running ``serve`` and return its reply;
    ControlError with a one-line message when that is not possible."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ControlError(f"{path}: no such socket (is 'colo-compare serve --control {path}' "
                           "running?)") from None
    except PermissionError:
        raise ControlError(f"{path}: permission denied") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"{path}: not a socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        try:
            sock.connect(path)
        except ConnectionRefusedError:
            raise ControlError(f"{path}: nothing is listening (serve not running?)") from None
        except PermissionError:
            raise ControlError(f"{path}: permission denied") from None
        except OSError as e:
            raise ControlError(f"{path}: {os_error_text(e)}") from None
        sock.sendall(json.dumps(request).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            try:
                chunk = sock.recv(1 << 20)
            except socket.timeout:
                raise ControlError(f"{path}: no answer within {timeout_s:g} s") from None
            except OSError as e:
                raise ControlError(f"{path}: {os_error_text(e)}") from None
            if not chunk:
                break
            buf += chunk
    finally:
        sock.close()
    try:
        reply = json.loads(buf)
    except ValueError:
        raise ControlError(f"{path}: not a colo-compare control socket (bad reply)") from None
    if not reply.get("ok"):
        raise ControlError(f"{path}: {reply.get('error', 'request failed')}")
    return reply
