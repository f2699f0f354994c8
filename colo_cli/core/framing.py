"""QEMU's length-prefixed socket framing, as a pure incremental codec.

Every record on colo-compare's sockets (primary_in, secondary_in, outdev and
notify_dev) is::

    be32 len  [be32 vnet_hdr_len, only with vnet_hdr_support]  len bytes

and with vnet_hdr_support the ``len`` bytes are the virtio-net header followed
by the Ethernet frame, so ``len`` counts the vnet header
(``docs/qemu.md`` section 2).

The decoder hands out each record *whole, as it was on the wire* (length words
included).  A released frame therefore goes to outdev as the very same bytes
object it arrived in: its vnet header is kept (QEMU does the same) and nothing
is re-encoded on the hot path.

Deliberate differences from QEMU's reader (``net_fill_rstate``):

* a length above ``max_record_len`` is rejected as soon as the length word is
  read, instead of after 69632 bytes have been swallowed (observed j1, j1b);
* a zero-length record is skipped and counted (QEMU aborts: observed j3);
* after an error the decoder refuses further input until it is replaced by a
  new one; the adapter closes the connection and uses a fresh decoder for the
  next one, so a reconnecting peer starts from a clean state (QEMU keeps the
  old parser state across reconnects: observed j5).
"""

from __future__ import annotations

import struct

#: QEMU's NET_BUFSIZE (4096 + 65536): the largest record payload, vnet header
#: included, that QEMU accepts (observed j2: 69632 is accepted, 69633 is not).
MAX_RECORD_LEN = 69632

_BE32 = struct.Struct(">I")
_BE32x2 = struct.Struct(">II")
_unpack_be32 = _BE32.unpack_from
_unpack_be32x2 = _BE32x2.unpack_from
_pack_be32 = _BE32.pack
_pack_be32x2 = _BE32x2.pack


class FrameDecoder:
    """Incremental decoder for one connection.

    ``feed(data)`` returns the complete records found so far as a list of
    ``(wire, vnet_hdr_len)`` tuples, where ``wire`` is the whole record as
    bytes (length word(s) included) and the Ethernet frame starts at
    ``header_len + vnet_hdr_len``.

    Problems do not raise out of ``feed``: zero-length records are skipped and
    counted in ``zero_length_records``; a hostile length stops the decoder and
    sets ``error`` to a one-line description, after which ``feed`` returns
    nothing.  Memory held is bounded by one record (``max_record_len`` plus
    the header) plus what one ``feed`` call brings.
    """

    __slots__ = ("vnet_hdr_support", "header_len", "max_record_len", "_buf",
                 "zero_length_records", "records", "error", "bytes_in")

    def __init__(self, vnet_hdr_support: bool = False,
                 max_record_len: int = MAX_RECORD_LEN) -> None:
        self.vnet_hdr_support = bool(vnet_hdr_support)
        self.header_len = 8 if self.vnet_hdr_support else 4
        self.max_record_len = max_record_len
        self._buf = b""
        self.zero_length_records = 0
        self.records = 0
        self.bytes_in = 0
        self.error: str | None = None

    @property
    def pending_bytes(self) -> int:
        """Bytes of an incomplete record held back (0 at a record boundary)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list:
        if self.error is not None:
            return []
        self.bytes_in += len(data)
        out: list = []
        start = 0
        pending = self._buf
        if pending:
            # Finish the record the last call cut short from the head of
            # ``data``, without copying the rest of ``data`` (a 256 KiB read
            # copied whole on every call showed in the profile).
            hdr = self.header_len
            if len(pending) < hdr:
                start = hdr - len(pending)
                pending += data[:start]
                if len(pending) < hdr:
                    self._buf = pending
                    return out
            length = _unpack_be32(pending, 0)[0]
            if 0 < length <= self.max_record_len:
                need = hdr + length - len(pending)
                if len(data) - start < need:
                    self._buf = pending + data[start:]
                    return out
                pending += data[start:start + need]
                start += need
            # (a zero or oversized length is dealt with by _scan)
            self._buf = b""
            rest = self._scan(pending, 0, out)
            if rest:
                # the pending record was a zero-length one: what followed it
                # belongs in front of data
                data = pending[rest:] + data[start:]
                start = 0
            if self.error is not None:
                return out
        self._scan(data, start, out)
        self.records += len(out)
        return out

    def _scan(self, buf: bytes, pos: int, out: list) -> int:
        """Append the complete records of ``buf[pos:]`` to ``out``; keep an
        incomplete tail in ``_buf``.  Returns the offset where a partial
        record of ``buf`` begins (0 when none is left)."""
        end = len(buf)
        append = out.append
        hdr = self.header_len
        limit = self.max_record_len
        vnet = self.vnet_hdr_support
        while end - pos >= hdr:
            # big-endian length words, read byte by byte (native in the
            # compiled build: no struct call, no tuple per record)
            length = (buf[pos] << 24) | (buf[pos + 1] << 16) | (buf[pos + 2] << 8) | buf[pos + 3]
            if vnet:
                vnet_len = ((buf[pos + 4] << 24) | (buf[pos + 5] << 16) | (buf[pos + 6] << 8)
                            | buf[pos + 7])
            else:
                vnet_len = 0
            if length > limit:
                self.error = (f"oversized record: length prefix {length} exceeds "
                              f"the {limit}-byte limit")
                self._buf = b""
                return 0
            if length == 0:
                # A record with nothing in it: QEMU asserts on it (observed
                # j3).  Skip it; a vnet word that comes with it is moot.
                self.zero_length_records += 1
                pos += hdr
                continue
            stop = pos + hdr + length
            if stop > end:
                break
            append((buf[pos:stop], vnet_len))
            pos = stop
        if pos < end:
            self._buf = buf[pos:]
            return pos
        return 0


def encode(frame: bytes, vnet_hdr: bytes | None = None) -> bytes:
    """Encode one record.  ``vnet_hdr=None`` means no vnet word (vnet off);
    ``b""`` means vnet on with a zero-length header."""
    if vnet_hdr is None:
        return _pack_be32(len(frame)) + frame
    return _pack_be32x2(len(vnet_hdr) + len(frame), len(vnet_hdr)) + vnet_hdr + frame


# --- notify_dev (Xen COLO userspace proxy) ---------------------------------

#: Xen -> comparator: announce; answered with GET_XEN_INIT.
MSG_PROXY_INIT = b"COLO_USERSPACE_PROXY_INIT"
#: comparator -> Xen: the reply to PROXY_INIT.
MSG_GET_XEN_INIT = b"COLO_COMPARE_GET_XEN_INIT"
#: Xen -> comparator: a checkpoint happened; flush the queues.
MSG_CHECKPOINT = b"COLO_CHECKPOINT"
#: comparator -> Xen: please checkpoint.
MSG_DO_CHECKPOINT = b"DO_CHECKPOINT"

#: notify messages are short ASCII words; anything longer is not one of them.
MAX_NOTIFY_LEN = 4096


def encode_notify(message: bytes) -> bytes:
    """A notify_dev message as QEMU writes it: be32 length + ASCII, never a
    vnet word and no terminator, whatever vnet_hdr_support says (observed
    section 3)."""
    return _pack_be32(len(message)) + message


class NotifyDecoder:
    """Decoder for what a Xen (or QEMU-style) peer sends on notify_dev.

    QEMU parses notify_dev *input* with the data framing, so with
    vnet_hdr_support=on it needs a vnet word that Xen's libxl never sends
    (observed section 3: the message is then silently misparsed).  We accept
    both forms on every record: every notify message starts with ASCII
    ("COLO..."), while a vnet word sent by a QEMU-style peer is a small
    integer (0 in practice), so the four bytes after the length tell which.
    """

    __slots__ = ("_buf", "error")

    def __init__(self) -> None:
        self._buf = b""
        self.error: str | None = None

    def feed(self, data: bytes) -> list[bytes]:
        if self.error is not None:
            return []
        buf = self._buf + data
        pos = 0
        out: list[bytes] = []
        end = len(buf)
        while end - pos >= 4:
            length = _unpack_be32(buf, pos)[0]
            if length > MAX_NOTIFY_LEN:
                self.error = (f"oversized notify message: length prefix {length} "
                              f"exceeds {MAX_NOTIFY_LEN} bytes")
                self._buf = b""
                return out
            hdr = 4
            if length and end - pos >= 8:
                word = _unpack_be32(buf, pos + 4)[0]
                # A vnet word is at most 20 (sizeof virtio_net_hdr_v1_hash);
                # ASCII text never starts with four bytes that small.
                if word <= 20 and length >= word:
                    hdr = 8
            elif length and end - pos < 8:
                break  # cannot tell yet whether a vnet word follows
            stop = pos + hdr + length
            if stop > end:
                break
            if length:
                vnet_len = _unpack_be32(buf, pos + 4)[0] if hdr == 8 else 0
                out.append(bytes(buf[pos + hdr + vnet_len:stop]))
            pos = stop
        self._buf = buf[pos:]
        return out
