"""What each command runs with: the options objects its ``run`` takes.

The command line builds one and calls one ``run`` (``serve.run``), as
uvicorn's command builds its ``Config``; a program can do the same without
the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .core import Config
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
    qmp_checkpoint_timeout_ms: float = 5000.0    # no RESUME this long after a request: release
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
