"""The sans-IO comparison core: no sockets, no files, no clock, no printing.

Bytes and ``now_ms`` go in, events come out (see ``comparator``).  This
module is the core's public face: the adapters (serve, replay, stats, the
renderers) import from here and nothing else of the core.
"""

from . import events as _events
from . import packet as _packet
from . import reassembly as _reassembly
from .comparator import Comparator, Config
from .events import (PRIMARY, SECONDARY, Bypassed, CheckpointCause, CheckpointDone,
                     CheckpointMode, CheckpointRequested, Dropped, InternalError, Matched, Miscompare,
                     MiscompareCause, Released, ReleaseReason, SecondaryAbsent, Side)
from .framing import (MSG_CHECKPOINT, MSG_DO_CHECKPOINT, MSG_GET_XEN_INIT, MSG_PROXY_INIT,
                      FrameDecoder, NotifyDecoder, encode, encode_notify)
from .noise import RuleError, parse_rule, ports_of
from .packet import KIND_NAMES, fragment_context
from .stats import HOLD_BOUNDS_S, Histogram

#: Every reason a frame can be passed through uncompared (a primary one,
#: ``Bypassed``) or dropped (a secondary one, ``Dropped``, as
#: ``secondary:REASON``): what ``parse`` refuses, what fragment reassembly
#: gives up, an internal error, the secondary's absence.
FRAME_REASONS: tuple = tuple(sorted(
    {v for k, v in vars(_packet).items() if k.startswith("REASON_")}
    | {v for k, v in vars(_reassembly).items() if k.startswith("FAIL_")}
    | {_events.REASON_INTERNAL_ERROR, _events.REASON_SECONDARY_ABSENT}))

__all__ = ["Comparator", "Config", "Side", "PRIMARY", "SECONDARY", "CheckpointMode",
           "Released", "Matched", "Bypassed", "Dropped", "Miscompare", "CheckpointRequested",
           "CheckpointDone", "SecondaryAbsent", "InternalError",
           "ReleaseReason", "CheckpointCause", "MiscompareCause", "FRAME_REASONS",
           "FrameDecoder", "NotifyDecoder", "encode", "encode_notify", "MSG_CHECKPOINT",
           "MSG_DO_CHECKPOINT", "MSG_GET_XEN_INIT", "MSG_PROXY_INIT",
           "RuleError", "parse_rule", "ports_of", "KIND_NAMES", "fragment_context",
           "Histogram", "HOLD_BOUNDS_S"]
