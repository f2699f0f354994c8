"""The comparator's settings.

A plain (interpreted) dataclass, outside the compiled modules on purpose: the
values given are kept exactly as given (a compiled ``float`` field would turn
``1000`` into ``1000.0``, and reports print the settings)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Config:
    """Comparator settings.  Names and defaults follow QEMU's properties
    where QEMU has one (``docs/qemu.md`` section 1)."""

    #: a queued frame older than this raises a checkpoint request (QEMU
    #: ``compare_timeout``); ``None`` switches timeouts off.
    compare_timeout_ms: float | None = 3000
    #: how often queued frames are checked for age (QEMU
    #: ``expired_scan_cycle``: 1000 ms in the code, though its docs say 3000).
    expired_scan_cycle_ms: float = 1000
    #: frames per connection and side (QEMU ``max_queue_size``; QEMU really
    #: keeps one more, observed k1: here the bound is exact).
    max_queue_size: int = 1024
    #: connections tracked at once (QEMU's HASHTABLE_MAX_SIZE).
    max_connections: int = 16384
    #: memory of the frames queued in all, both sides: their bytes plus
    #: QUEUED_FRAME_OVERHEAD each for what holds them (so tiny frames cannot
    #: multiply the memory the bound names).  TCP payload waiting to be
    #: compared is held once more, in its stream: up to twice this for TCP.
    #: What flushed datagram connections remember for late secondary copies
    #: counts against it too, and is forgotten first (``StaleMemory``).
    max_queued_bytes: int = 256 * 1024 * 1024
    #: a connection with nothing queued and no traffic for this long is
    #: forgotten (its TCP comparison state with it).
    idle_timeout_ms: float = 120_000
    #: an IP datagram whose fragments have not all arrived after this long
    #: is given up (its primary fragments bypassed): Linux's ipfrag_time.
    fragment_timeout_ms: float = 30_000
    #: compare TCP in relative sequence numbers, per side (the replicas chose
    #: their own ISNs: no filter-rewriter, or captures of two instances)
    normalize_seq: bool = False
    #: noise rules (noise.Rule): bytes that legitimately differ
    ignore: tuple = ()

    def validate(self) -> None:
        if self.compare_timeout_ms is not None and self.compare_timeout_ms <= 0:
            raise ValueError("compare timeout must be positive")
        if self.expired_scan_cycle_ms <= 0:
            raise ValueError("expired scan cycle must be positive")
        if self.max_queue_size < 1:
            raise ValueError("max queue size must be at least 1")
        if self.max_connections < 1:
            raise ValueError("max connections must be at least 1")
        if self.max_queued_bytes < 1:
            raise ValueError("max queued bytes must be at least 1")
        if self.fragment_timeout_ms <= 0:
            raise ValueError("fragment timeout must be positive")
