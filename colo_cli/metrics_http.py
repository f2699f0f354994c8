"""``serve --metrics-listen HOST:PORT``: ``/metrics`` over HTTP, for a
Prometheus server to scrape ``serve`` directly.

The body is ``metrics.prometheus`` of serve's own stats document, the very
text ``colo-compare stats --format prometheus`` prints (one format
implementation), made at each scrape from the same snapshot the control
socket answers with.

The HTTP side is as small as a scrape needs: ``GET`` (and ``HEAD``) of
``/metrics``; one request per connection, answered and closed; requests are
bounded (a request line and headers of at most 16 KiB, read within 10 s),
so a slow or hostile client costs one connection, never the comparator's
loop.  Anything else gets 404 or 405.  No TLS or authentication: bind it to
loopback or a management network, or put a proxy in front.
"""

from __future__ import annotations

import asyncio
import contextlib

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
REQUEST_MAX = 16 * 1024
REQUEST_TIMEOUT_S = 10.0


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPV6]:PORT`` or ``:PORT`` (every interface) ->
    (host, port); host "" means every interface.  ValueError with a
    one-line message otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:9464, [::1]:9464, :9464)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: an IPv6 address goes in brackets ([::1]:9464)")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 0 to 65535")
    return host, int(port)


class MetricsServer:
    """Serves ``render()`` (the exposition text) at ``/metrics``."""

    def __init__(self, render, host: str, port: int) -> None:
        self.render = render
        self.host = host
        self.port = port
        self._srv = None

    async def start(self) -> None:
        """Listen; OSError when the address cannot be bound."""
        self._srv = await asyncio.start_server(self._client, self.host or None, self.port,
                                               limit=REQUEST_MAX, reuse_address=True)
        if self.port == 0:
            self.port = self._srv.sockets[0].getsockname()[1]

    def close(self) -> None:
        if self._srv is not None:
            self._srv.close()
            self._srv = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
            except asyncio.IncompleteReadError as e:
                head = e.partial          # a client that sends a bare request line and closes
            except (asyncio.LimitOverrunError, ValueError):
                await self._reply(writer, 431, "request too large\n")
                return
            except asyncio.TimeoutError:
                return
            line = head.split(b"\r\n", 1)[0].split(b"\n", 1)[0].decode("latin-1")
            parts = line.split()
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                await self._reply(writer, 400, "bad request\n")
                return
            method, target = parts[0], parts[1]
            path = target.split("?", 1)[0]
            if path not in ("/metrics", "/"):
                await self._reply(writer, 404, "not found: the metrics are at /metrics\n")
                return
            if method not in ("GET", "HEAD"):
                await self._reply(writer, 405, "method not allowed\n", extra="Allow: GET, HEAD\r\n")
                return
            if path == "/":
                await self._reply(writer, 200, "colo-compare serve: the metrics are at /metrics\n",
                                  head_only=method == "HEAD")
                return
            await self._reply(writer, 200, self.render(), content_type=CONTENT_TYPE,
                              head_only=method == "HEAD")
        except (ConnectionError, OSError):
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    @staticmethod
    async def _reply(writer, status: int, body: str, *, content_type="text/plain; charset=utf-8",
                     extra: str = "", head_only: bool = False) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  431: "Request Header Fields Too Large"}[status]
        data = body.encode("utf-8")
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(data)}\r\n{extra}Connection: close\r\n\r\n")
        writer.write(head.encode("latin-1") + (b"" if head_only else data))
        await writer.drain()
