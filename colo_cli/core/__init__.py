"""The sans-IO comparison core: no sockets, no files, no clock, no printing.

Bytes and ``now_ms`` go in, events come out (see ``comparator``)."""

from .comparator import Comparator, Config
from .events import (PRIMARY, SECONDARY, Bypassed, CheckpointCause, CheckpointDone,
                     CheckpointMode, CheckpointRequested, Dropped, InternalError, Matched, Miscompare,
                     MiscompareCause, Released, ReleaseReason, SecondaryAbsent, Side)

__all__ = ["Comparator", "Config", "Side", "PRIMARY", "SECONDARY", "CheckpointMode",
           "Released", "Matched", "Bypassed", "Dropped", "Miscompare", "CheckpointRequested",
           "CheckpointDone", "SecondaryAbsent", "InternalError",
           "ReleaseReason", "CheckpointCause", "MiscompareCause"]
