"""IP fragment reassembly, per side, bounded in memory and time.

QEMU does not reassemble: it keys every fragment as if it were a datagram
(non-first fragments get garbage "ports") and its TODO says "support ip
fragment" (``docs/qemu.md`` section 3).  Here each side's fragments are
put back together and the whole datagram is compared like any other; the
frames released are the original fragments, in the order they arrived.

Fragments are keyed by addresses, protocol and IP ID (IPv4) or
identification (IPv6): the replicas choose their IDs independently, so
reassembly is per side and the reassembled datagrams are then keyed and
compared like unfragmented ones.

Overlapping fragments are resolved first-come-first-kept (later bytes never
overwrite earlier ones, so an overlap cannot rewrite what was seen first) and
counted; an overlap that disagrees with what was kept is counted separately.

Bounds: ``max_fragments`` per datagram, ``MAX_DATAGRAM`` bytes per datagram,
``max_datagrams`` in progress and ``max_bytes`` of fragment data per side.
Past a bound, or past ``timeout_ms``, a datagram fails: the comparator
bypasses its primary fragments and drops its secondary ones, with a reason.
"""

from __future__ import annotations

from typing import Any

#: the largest reassembled IP payload (IPv4: 65535 - 20; IPv6 without
#: jumbograms: 65535).
MAX_DATAGRAM = 65535

FAIL_TIMEOUT = "fragment-timeout"         # never completed in time
FAIL_OVERFLOW = "fragment-overflow"       # too many fragments or datagrams in progress
FAIL_INVALID = "fragment-invalid"         # beyond 64 KiB, or inconsistent ends
FAIL_INCOMPLETE = "fragment-incomplete"   # still incomplete at the end of input


class Datagram:
    __slots__ = ("key", "fragments", "pieces", "total", "first_ms", "size", "proto")

    def __init__(self, key: bytes, proto: int, now_ms: float) -> None:
        self.key = key
        self.proto = proto
        self.fragments: list[Any] = []    # the original frames (Packet), in arrival order
        self.pieces: list[tuple[int, bytes]] = []   # (offset, bytes), in arrival order
        self.total: int | None = None     # payload length, once the last fragment is seen
        self.first_ms = now_ms
        self.size = 0                 # bytes of fragment payload held

    def covered(self) -> bool:
        if self.total is None:
            return False
        reach = 0
        for off, data in sorted(self.pieces, key=lambda p: p[0]):
            if off > reach:
                return False
            reach = max(reach, off + len(data))
        return reach >= self.total

    def assemble(self) -> tuple[bytes, int, int]:
        """The datagram's payload; and the bytes where fragments overlapped,
        and of those, where they disagreed."""
        ordered = sorted(self.pieces, key=lambda p: p[0])
        reach = 0
        for off, data in ordered:
            if off != reach:
                break
            reach += len(data)
        else:
            if reach == self.total:
                # the usual case: no overlap, nothing missing
                return b"".join(data for _, data in ordered), 0, 0
        total = self.total
        assert total is not None
        buf = bytearray(total)
        filled = bytearray(total)
        overlap = conflict = 0
        for off, data in self.pieces:
            end = min(off + len(data), total)
            for i in range(off, end):
                if filled[i]:
                    overlap += 1
                    if buf[i] != data[i - off]:
                        conflict += 1
                else:
                    buf[i] = data[i - off]
                    filled[i] = 1
        return bytes(buf), overlap, conflict


class Reassembler:
    """The fragments in progress of one side."""

    __slots__ = ("pending", "bytes", "max_datagrams", "max_bytes", "max_fragments")

    def __init__(self, max_datagrams: int = 1024, max_bytes: int = 8 * 1024 * 1024,
                 max_fragments: int = 128) -> None:
        self.pending: dict[bytes, Datagram] = {}   # oldest first
        self.bytes = 0
        self.max_datagrams = max_datagrams
        self.max_bytes = max_bytes
        self.max_fragments = max_fragments

    def __len__(self) -> int:
        return len(self.pending)

    def add(self, pkt, key: bytes, offset: int, more: int, proto: int, payload: bytes,
            now_ms) -> tuple:
        """Add one fragment.  Returns ``(complete, failed)``: the datagram it
        completed (or None) and a list of ``(datagram, reason)`` that failed."""
        failed: list = []
        dg = self.pending.get(key)
        if dg is None:
            dg = self.pending[key] = Datagram(key, proto, now_ms)
        dg.fragments.append(pkt)
        dg.pieces.append((offset, payload))
        dg.size += len(payload)
        self.bytes += len(payload)
        end = offset + len(payload)
        if not more:
            if dg.total is not None and dg.total != end:
                return None, self._fail(dg, FAIL_INVALID, failed)
            dg.total = end
        if end > MAX_DATAGRAM or (dg.total is not None and end > dg.total):
            return None, self._fail(dg, FAIL_INVALID, failed)
        if len(dg.fragments) > self.max_fragments:
            return None, self._fail(dg, FAIL_OVERFLOW, failed)
        if dg.covered():
            del self.pending[key]
            self.bytes -= dg.size
            return dg, self._enforce_bounds(failed)
        return None, self._enforce_bounds(failed)

    def _fail(self, dg: Datagram, reason: str, failed: list) -> list:
        if self.pending.pop(dg.key, None) is not None:
            self.bytes -= dg.size
        failed.append((dg, reason))
        return failed

    def _enforce_bounds(self, failed: list) -> list:
        while self.pending and (len(self.pending) > self.max_datagrams or self.bytes > self.max_bytes):
            oldest = next(iter(self.pending.values()))
            self._fail(oldest, FAIL_OVERFLOW, failed)
        return failed

    def expire(self, now_ms, timeout_ms) -> list:
        """Datagrams older than ``timeout_ms``, failed."""
        failed: list = []
        limit = now_ms - timeout_ms
        while self.pending:
            oldest = next(iter(self.pending.values()))
            if oldest.first_ms > limit:
                break
            self._fail(oldest, FAIL_TIMEOUT, failed)
        return failed

    def drain(self, reason: str = FAIL_INCOMPLETE) -> list:
        failed: list = []
        for dg in list(self.pending.values()):
            self._fail(dg, reason, failed)
        return failed
