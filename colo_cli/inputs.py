"""serve's two frame inputs: from a read of either to what leaves on outdev.

Every read of a frame input ends here (``FrameInputs.on_primary`` /
``on_secondary``, each input's ``Link`` handler): the bytes go through the
input's framing decoder to the core in one call (``receive_records``), a
frame the core releases on a match is appended to outdev's queue and sent
at once, and a read that leaves frames waiting for their twins reads the
other input ahead (the twin is usually there already; see
``links.LoopSelector``).  Everything else (any other event, the core's
timer, a framing error, logging) is the server's, called back on the
object given as ``server``: serve's ``Server``.

Why a module of its own: with one frame per read (the latency case) this
glue, interpreted, cost about as many instructions per pair as the core
itself (callgrind).  ``setup.py`` compiles it with mypyc with the core (and
``outqueue``), the same source running interpreted when nothing was
compiled (``_build``).  Unlike the core it does I/O: it reads and sends
through the links.
"""

from __future__ import annotations

from time import monotonic
from typing import Any

from .core.comparator import Comparator
from .core.events import Matched
from .core.framing import FrameDecoder
from .outqueue import OutQueue


class FrameInputs:
    """The frame inputs' per-read path.  ``server`` gives: ``timer_at``
    (when the core's armed scan is due, or None), ``scan_now()``,
    ``rearm()``, ``handle(events, now_ms)``, ``trim_outdev()``,
    ``checkpoint_wanted`` and ``send_do_checkpoint()``,
    ``zero_length_skipped(side, link, count)``,
    ``framing_error(side, link, error)``."""

    def __init__(self, server: Any, comparator: Comparator, header_len: int) -> None:
        self.server: Any = server
        self.comparator: Comparator = comparator
        self.header_len: int = header_len
        #: [primary, secondary] Links, and outdev's Link and queue (attach)
        self.links: list[Any] = [None, None]
        self.outdev: Any = None
        self.out: OutQueue = OutQueue(0)      # (outdev's own, from attach on)
        #: each input's decoder while it is connected (a new one per connection)
        self.decoders: list[FrameDecoder | None] = [None, None]
        self.zero_seen: list[int] = [0, 0]
        self.reading_other: bool = False    # a read is reading the other input ahead

    def attach(self, primary: Any, secondary: Any, outdev: Any) -> None:
        self.links = [primary, secondary]
        self.outdev = outdev
        self.out = outdev.out

    def connected(self, side: int, decoder: FrameDecoder) -> None:
        """A new peer on input ``side``: nothing of the last connection's
        stream survives."""
        self.decoders[side] = decoder
        self.zero_seen[side] = 0

    def disconnected(self, side: int) -> FrameDecoder | None:
        """The peer on ``side`` is gone: its decoder (what it held of a cut
        record), which is forgotten here."""
        decoder = self.decoders[side]
        self.decoders[side] = None
        return decoder

    def on_primary(self, link: Any, data: bytes) -> None:
        self._on_frames(0, link, data)

    def on_secondary(self, link: Any, data: bytes) -> None:
        self._on_frames(1, link, data)

    def _on_frames(self, side: int, link: Any, data: bytes) -> None:
        decoder = self.decoders[side]
        if decoder is None:
            return
        server = self.server
        records = decoder.feed(data)
        zero = decoder.zero_length_records
        if zero != self.zero_seen[side]:
            server.zero_length_skipped(side, link, zero - self.zero_seen[side])
            self.zero_seen[side] = zero
        now = monotonic() * 1000.0              # = Server.now_ms(): the loop's clock
        timer_at = server.timer_at
        if timer_at is not None and now >= timer_at:
            # a scan is due and the loop has not run its timer yet (a busy
            # loop serves ready sockets first): scan before these frames, or
            # frames past the timeout would wait for the next read, or be
            # released by it, later than the core decided they should leave
            server.scan_now()
        comparator = self.comparator
        queued_before = comparator.queued_frames
        events = comparator.receive_records(side, records, now, self.header_len)
        out = self.out
        frames = out.frames
        appended = False
        for e in events:
            if isinstance(e, Matched):
                # the common case: a frame released on a match
                wire = e.data
                frames.append(wire)
                out.bytes += len(wire)
                appended = True
            else:
                server.trim_outdev()
                server.handle([e], now)
        if appended and (out.over_limit() or out.bytes > out.high_water):
            server.trim_outdev()                      # (only then has it work to do)
        if server.checkpoint_wanted:
            server.send_do_checkpoint()
        if decoder.error is not None:
            server.framing_error(side, link, decoder.error)
        if frames:
            self.outdev.flush()
        if self.reading_other:
            return                              # (the read that read ahead arms the timer)
        if comparator.queued_frames > queued_before:
            # This read left frames waiting for their twins: read the other
            # input now, not at the loop's next turn.  The two copies of a
            # packet arrive microseconds apart, so the twin is usually
            # there, and this saves a loop iteration per packet.  One level
            # deep: that read does not come back here.
            self.reading_other = True
            try:
                self.links[1 - side].read_ahead()
            finally:
                self.reading_other = False
        server.rearm()                     # once, after both reads
