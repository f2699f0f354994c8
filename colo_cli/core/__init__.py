"""The sans-IO comparison core: no sockets, no files, no clock, no printing.

Bytes and ``now_ms`` go in, events come out (see ``comparator``)."""

from .comparator import Comparator, Config
from .events import (PRIMARY, SECONDARY, Bypassed, CheckpointDone,
                     CheckpointRequested, Dropped, Miscompare, Released, Side)

__all__ = ["Comparator", "Config", "Side", "PRIMARY", "SECONDARY", "Released",
           "Bypassed", "Dropped", "Miscompare", "CheckpointRequested", "CheckpointDone"]
