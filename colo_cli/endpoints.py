"""Socket endpoints in QEMU's legacy chardev syntax.

    tcp:HOST:PORT              connect to HOST:PORT (and reconnect when lost)
    tcp:HOST:PORT,server       listen on HOST:PORT (one peer at a time)
    unix:PATH                  connect to the unix socket PATH
    unix:PATH,server           listen on PATH

QEMU users recognise these from ``-chardev``/``-serial``.  The options QEMU
also takes are accepted: ``server=on|off``, ``nowait``/``wait=on|off`` (we
never block waiting for a peer, so both are no-ops) and ``reconnect=SECONDS``
(the interval between connection attempts of a client endpoint).  IPv6
hosts go in brackets: ``tcp:[::1]:9000``.
"""

from __future__ import annotations

from dataclasses import dataclass

SYNTAX = "tcp:HOST:PORT[,server] or unix:PATH[,server]"


@dataclass(frozen=True)
class Endpoint:
    kind: str                   # "tcp" or "unix"
    server: bool                # listen (True) or connect (False)
    host: str = ""
    port: int = 0
    path: str = ""
    reconnect_s: float | None = None   # client: fixed retry interval (QEMU's reconnect=)

    def __str__(self) -> str:
        where = f"tcp:{_host_text(self.host)}:{self.port}" if self.kind == "tcp" else f"unix:{self.path}"
        return where + (",server" if self.server else "")

    @property
    def address(self):
        return (self.host, self.port) if self.kind == "tcp" else self.path


def _host_text(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _on_off(name: str, value: str | None, text: str) -> bool:
    if value is None or value in ("on", "yes", "true"):
        return True
    if value in ("off", "no", "false"):
        return False
    raise ValueError(f"{text!r}: {name}={value} is not on or off")


def parse_endpoint(text: str) -> Endpoint:
    """Parse an endpoint; ValueError with a one-line message when it is not
    one."""
    if not text:
        raise ValueError(f"empty endpoint; expected {SYNTAX}")
    head, *options = text.split(",")
    server = False
    reconnect_s = None
    for opt in options:
        name, _, value = opt.partition("=")
        value = value if _ else None
        if name == "server":
            server = _on_off(name, value, text)
        elif name in ("nowait",):
            continue
        elif name == "wait":
            _on_off(name, value, text)
        elif name == "reconnect":
            try:
                reconnect_s = float(value or "")
            except ValueError:
                raise ValueError(f"{text!r}: reconnect= takes a number of seconds") from None
            if reconnect_s <= 0:
                raise ValueError(f"{text!r}: reconnect= must be positive")
        elif name in ("nodelay", "telnet", "tls-creds", "websocket"):
            raise ValueError(f"{text!r}: option {name!r} is not supported by colo-compare")
        else:
            raise ValueError(f"{text!r}: unknown option {name!r}; expected {SYNTAX}")
    kind, sep, rest = head.partition(":")
    if not sep:
        raise ValueError(f"{text!r}: expected {SYNTAX}")
    if kind == "unix":
        if not rest:
            raise ValueError(f"{text!r}: unix: needs a path")
        return Endpoint("unix", server, path=rest, reconnect_s=reconnect_s)
    if kind == "tcp":
        if rest.startswith("["):
            host, bracket, port_text = rest[1:].partition("]")
            if not bracket or not port_text.startswith(":"):
                raise ValueError(f"{text!r}: expected tcp:[IPV6]:PORT")
            port_text = port_text[1:]
        else:
            host, colon, port_text = rest.rpartition(":")
            if not colon:
                raise ValueError(f"{text!r}: expected tcp:HOST:PORT")
        if not host:
            # QEMU's tcp::PORT means every address for a server, localhost for a client
            host = "0.0.0.0" if server else "127.0.0.1"
        try:
            port = int(port_text)
        except ValueError:
            raise ValueError(f"{text!r}: port {port_text!r} is not a number") from None
        if not 0 < port < 65536:
            raise ValueError(f"{text!r}: port {port} is out of range (1-65535)")
        return Endpoint("tcp", server, host=host, port=port, reconnect_s=reconnect_s)
    raise ValueError(f"{text!r}: unknown endpoint type {kind!r}; expected {SYNTAX}")
