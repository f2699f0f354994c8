"""What each command runs with: the options objects its ``run`` takes.

The command line builds one and calls one ``run`` (``serve.run``), as
uvicorn's command builds its ``Config``; a program can do the same without
the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .core import Config

if TYPE_CHECKING:
    from .endpoints import Endpoint

POLICY_RELEASE = "release"   # checkpoint at once, locally: the primary wins
POLICY_HOLD = "hold"         # hold until COLO_CHECKPOINT or a control "checkpoint"
POLICY_QMP = "qmp"           # hold and ask QEMU's COLO over QMP; release outside COLO


@dataclass
class ServeOptions:
    primary_in: Endpoint
    secondary_in: Endpoint
    outdev: Endpoint
    notify_dev: Endpoint | None = None
    config: Config = field(default_factory=Config)
    vnet_hdr_support: bool = False
    checkpoint_policy: str | None = None        # default: hold with notify_dev, qmp with qmp,
                                                 # else release
    qmp: Endpoint | None = None                  # the primary QEMU's QMP monitor
    qmp_checkpoint_timeout_ms: float = 5000      # no RESUME this long after a request: release
    control_path: str | None = None
    events_path: str | None = None
    #: hexdumps of the first N miscompares on stderr (None: of every one),
    #: at most hexdumps_per_minute
    hexdump: int | None = 0
    hexdumps_per_minute: int = 10
    color: str = "auto"                          # of the hexdumps: auto, always, never
    outdev_buffer_bytes: int = 256 * 1024 * 1024
    connect_timeout_s: float = 30.0              # 0: wait forever for a first connection
    drain_timeout_s: float = 5.0
    #: poll the sockets this long before sleeping, while packets come closer
    #: together than that (links.LoopSelector); 0: always sleep at once
    busy_poll_us: int = 50
    verbose: int = 0                             # -1 quiet, 0 normal, 1 verbose
    debug: bool = False                          # tracebacks of internal errors
    metrics_listen: tuple[str, int] | None = None   # (host, port) of /metrics; "" every interface

    @property
    def policy(self) -> str:
        if self.checkpoint_policy:
            return self.checkpoint_policy
        if self.qmp is not None:
            return POLICY_QMP
        return POLICY_HOLD if self.notify_dev is not None else POLICY_RELEASE


@dataclass
class ReplayOptions:
    """What ``replay.run`` (and ``learn.run``, for ``--learn-noise``) compares,
    writes and prints."""
    primary: str                                 # capture paths; "-": standard input
    secondary: str
    config: Config = field(default_factory=Config)
    hold: bool = False                           # hold diverged connections to the end
    vnet_hdr_len: int = 0                        # bytes of virtio-net header before each frame
    #: the frames compared (replay.Selection): the direction ("out", "in",
    #: None for both) of captures that record one, a tcpdump expression,
    #: a window on each capture's own timeline (ns from its first frame)
    direction: str | None = "out"
    filter_expr: str | None = None
    start_ns: int | None = None
    end_ns: int | None = None
    out_path: str | None = None                  # every primary frame ("-": stdout)
    diverged_path: str | None = None             # the primary frames that left unmatched
    evidence_path: str | None = None             # miscompared pairs, a pcapng for Wireshark
    as_json: bool = False                        # the JSON document instead of the report
    #: hexdumps of the first N miscompares in the report (None: of every one)
    hexdump: int | None = 3
    verbose: int = 0                             # -1 quiet, 0 normal, 1 verbose
    color: str = "auto"                          # auto, always, never
