"""QMP, the QEMU Machine Protocol, as a sans-IO client codec.

Theory of operation
-------------------

QMP is line-delimited JSON over a stream socket.  The server (QEMU) speaks
first, with one greeting object::

    {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 22}, ...},
             "capabilities": ["oob"]}}

and accepts no command but ``qmp_capabilities`` until the client has sent
it ("capabilities negotiation").  From then on the client sends commands::

    {"execute": "query-migrate", "arguments": {...}, "id": 7}

and the server answers each one, in the order they came, with exactly one of::

    {"return": VALUE, "id": 7}
    {"error": {"class": "GenericError", "desc": "..."}, "id": 7}

Between answers, at any time, it sends events::

    {"event": "STOP", "data": {...}, "timestamp": {"seconds": S, "microseconds": US}}

QEMU ends its lines with CRLF; a bare LF is enough in both directions.

:class:`QmpClient` holds no socket and no clock.  ``receive(data)`` takes
bytes as they arrive and returns the messages they complete
(:class:`Greeting`, :class:`Reply`, :class:`Event`); ``command(name,
arguments)`` returns the bytes to send and the id the reply will carry.  The
client keeps the protocol's order honest:

* the first message must be a greeting, and only the first;
* a reply must answer a command that was sent and not yet answered (by its
  id); the command's name is handed back with it;
* everything it holds is bounded: one line of at most ``max_line_bytes``
  (what is not yet a whole line counts), and at most ``MAX_PENDING``
  commands awaiting their replies.

Anything else is the peer breaking the protocol, or not being a QMP server
at all: ``receive`` stops, sets ``error`` to a one-line description and
returns what it had decoded before; every later call returns nothing.  The
adapter then closes the connection and starts the next one with a new
client, so nothing of a broken stream survives a reconnect.

States::

    GREETING      nothing received yet
    NEGOTIATING   greeting received; ``qmp_capabilities`` not yet answered
    READY         ``qmp_capabilities`` answered with success
    FAILED        ``error`` is set

Commands may be sent in any state but FAILED once the greeting is in; QEMU
executes them in order, so sending ``qmp_capabilities`` and the first
queries together is fine.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any

#: The longest line accepted from the peer.  QEMU's answers to the commands
#: serve sends are under 2 KiB and its events under 1 KiB; a peer that sends
#: more than this without a newline is not talking QMP to us.
MAX_LINE_BYTES = 64 * 1024
#: Commands sent and not yet answered, at most (serve has a handful at a time).
MAX_PENDING = 32


class State(enum.Enum):
    GREETING = "greeting"
    NEGOTIATING = "negotiating"
    READY = "ready"
    FAILED = "failed"


@dataclass(slots=True)
class Greeting:
    """The server's first line.  ``version`` is ``"MAJOR.MINOR.MICRO"`` when
    the greeting says (empty otherwise); ``package`` is QEMU's build string
    (Debian's, for example)."""
    version: str
    package: str
    capabilities: tuple


@dataclass(slots=True)
class Reply:
    """The answer to the command sent as ``command`` with id ``id``: ``ok``
    with ``value`` (the ``return`` member), or not ``ok`` with
    ``error_class`` and ``error_desc``."""
    id: int
    command: str
    ok: bool
    value: Any = None
    error_class: str = ""
    error_desc: str = ""


@dataclass(slots=True)
class Event:
    """An asynchronous event.  ``timestamp_s`` is the server's own time of
    it (seconds since the epoch, from the host's real-time clock in QEMU),
    None when the event carries none."""
    name: str
    data: dict = field(default_factory=dict)
    timestamp_s: float | None = None


class QmpClient:
    """The client side of one QMP connection (see the module docstring)."""

    __slots__ = ("max_line_bytes", "state", "error", "greeting", "_buf", "_pending", "_next_id")

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self.max_line_bytes = max_line_bytes
        self.state = State.GREETING
        self.error: str | None = None
        self.greeting: Greeting | None = None
        self._buf = bytearray()
        self._pending: dict[int, str] = {}     # id -> command name, oldest first
        self._next_id = 1

    @property
    def pending(self) -> int:
        """Commands sent and not yet answered."""
        return len(self._pending)

    # -- output ----------------------------------------------------------------------
    def command(self, name: str, arguments: dict | None = None) -> tuple[int, bytes]:
        """The bytes of one command, and the id its reply will carry.

        ValueError if the connection cannot take a command: before the
        greeting, after an error, or with ``MAX_PENDING`` already waiting
        (the caller's bug, not the peer's)."""
        if self.state is State.GREETING:
            raise ValueError("no QMP greeting yet")
        if self.state is State.FAILED:
            raise ValueError(f"QMP connection failed: {self.error}")
        if len(self._pending) >= MAX_PENDING:
            raise ValueError(f"{MAX_PENDING} QMP commands already wait for their replies")
        ident = self._next_id
        self._next_id += 1
        msg: dict = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        msg["id"] = ident
        self._pending[ident] = name
        return ident, json.dumps(msg, separators=(",", ":")).encode() + b"\n"

    # -- input -----------------------------------------------------------------------
    def receive(self, data: bytes) -> list:
        """The messages completed by ``data`` (see the module docstring)."""
        out: list = []
        if self.error is not None:
            return out
        buf = self._buf
        buf += data
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            if end - start > self.max_line_bytes:
                self._fail(f"a line longer than {self.max_line_bytes} bytes")
                return out
            line = bytes(buf[start:end])
            start = end + 1
            if line.strip():
                msg = self._message(line)
                if msg is None:
                    return out
                out.append(msg)
        del buf[:start]
        if len(buf) > self.max_line_bytes:
            self._fail(f"a line longer than {self.max_line_bytes} bytes")
        return out

    def _fail(self, why: str) -> None:
        self.error = why
        self.state = State.FAILED
        self._buf = bytearray()
        self._pending.clear()

    def _message(self, line: bytes):
        try:
            obj = json.loads(line)
        except ValueError:       # (UnicodeDecodeError is one too)
            self._fail(f"not JSON: {_excerpt(line)}")
            return None
        if not isinstance(obj, dict):
            self._fail(f"not a JSON object: {_excerpt(line)}")
            return None
        if self.state is State.GREETING:
            greeting = obj.get("QMP")
            if not isinstance(greeting, dict):
                self._fail(f"not a QMP greeting: {_excerpt(line)}")
                return None
            self.greeting = _greeting(greeting)
            self.state = State.NEGOTIATING
            return self.greeting
        if "event" in obj:
            name = obj["event"]
            data = obj.get("data", {})
            if not isinstance(name, str) or not isinstance(data, dict):
                self._fail(f"malformed event: {_excerpt(line)}")
                return None
            return Event(name, data, _timestamp(obj.get("timestamp")))
        if "return" in obj or "error" in obj:
            return self._reply(obj, line)
        if "QMP" in obj:
            self._fail("a second QMP greeting")
        else:
            self._fail(f"not a QMP message: {_excerpt(line)}")
        return None

    def _reply(self, obj: dict, line: bytes):
        ident = obj.get("id")
        if type(ident) is not int or ident not in self._pending:
            self._fail("a reply to no command we sent" if ident is not None
                       else f"a reply without an id: {_excerpt(line)}")
            return None
        name = self._pending.pop(ident)
        if "error" in obj:
            err = obj["error"]
            if not isinstance(err, dict):
                err = {"desc": str(err)}
            reply = Reply(ident, name, False, None, str(err.get("class", "")),
                          str(err.get("desc", "")))
            if name == "qmp_capabilities" and self.state is State.NEGOTIATING:
                self._fail(f"qmp_capabilities refused: {reply.error_desc or reply.error_class}")
                return None
            return reply
        if name == "qmp_capabilities" and self.state is State.NEGOTIATING:
            self.state = State.READY
        return Reply(ident, name, True, obj["return"])


def _greeting(g: dict) -> Greeting:
    version = ""
    package = ""
    v = g.get("version")
    if isinstance(v, dict):
        q = v.get("qemu")
        if isinstance(q, dict) and all(isinstance(q.get(k), int) for k in ("major", "minor", "micro")):
            version = f"{q['major']}.{q['minor']}.{q['micro']}"
        if isinstance(v.get("package"), str):
            package = v["package"].strip()
    caps = g.get("capabilities")
    return Greeting(version, package, tuple(caps) if isinstance(caps, list) else ())


def _timestamp(ts) -> float | None:
    if not isinstance(ts, dict):
        return None
    s, us = ts.get("seconds"), ts.get("microseconds")
    if type(s) is not int or type(us) is not int or s < 0:
        return None          # QEMU sends -1 when it could not read the clock
    return s + us / 1e6


def _excerpt(line: bytes, n: int = 40) -> str:
    """The start of a bad line, printable, for a one-line message."""
    text = line[:n].decode("ascii", "backslashreplace")
    text = "".join(c if c.isprintable() else "?" for c in text)
    return repr(text + ("..." if len(line) > n else ""))
