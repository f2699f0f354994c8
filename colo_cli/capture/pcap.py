"""Classic pcap: the reader and the writer.

Read as libpcap reads it (``sf-pcap.c``): versions 2.0 to 2.4 and DG/UX's
543.0, either byte order, microsecond and nanosecond magics and the
"modified pcap" of Alexey Kuznetzov (8 more bytes per record header); the
captured and original lengths swapped as libpcap swaps them for versions
before 2.3; the link type in the low 16 bits of its field (the upper bits
carry FCS flags, or junk).  A record header cut short, or a captured length
above ``MAX_CAPLEN``, ends the file with a warning: what was read before it
is compared.

The writer writes version 2.4, little-endian, and builds every header
itself: dpkt's writer records ``tv_usec = 1000000`` for 1.9999999 s and
claims a snaplen of 1500 whatever it writes (``docs/captures.md``).
"""

from __future__ import annotations

import struct
from typing import BinaryIO, Iterator

from .base import (MAX_CAPLEN, NS_PER_S, CaptureReader, TimestampError, check_ts_ns,
                   output_name)
from .linktypes import LINKTYPE_ETHERNET

# magic (as stored) -> (struct byte order, ns per fraction unit, record header bytes)
PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1000, 16),
    b"\xa1\xb2\xc3\xd4": (">", 1000, 16),
    b"\x4d\x3c\xb2\xa1": ("<", 1, 16),
    b"\xa1\xb2\x3c\x4d": (">", 1, 16),
    # Alexey Kuznetzov's "modified pcap": 8 more bytes per record header
    # (ifindex, protocol, pkt_type, pad), microsecond timestamps.
    b"\x34\xcd\xb2\xa1": ("<", 1000, 24),
    b"\xa1\xb2\xcd\x34": (">", 1000, 24),
}


class PcapReader(CaptureReader):
    """A pcap file (see :class:`~colo_cli.capture.base.CaptureReader`)."""

    format = "pcap"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._pcap_order = "<"
        self._pcap_frac_ns = 1000
        self._pcap_hdr_len = 16
        self._pcap_swap = ""  # "", "always" or "maybe" (libpcap's lengths_swapped)

    def start(self, magic: bytes) -> None:
        order, frac_ns, hdr_len = PCAP_MAGICS[magic]
        src = self._src
        if not src.fill(24):
            raise self._fail("pcap file header cut short (%d of 24 bytes)" % src.available())
        major, minor, _zone, _sigfigs, snaplen, linktype_field = struct.unpack_from(
            order + "HHiIII", src.buf, src.pos + 4)
        # libpcap reads 2.0-2.4 and DG/UX's 543.0, nothing else.
        if not ((major == 2 and minor <= 4) or (major == 543 and minor == 0)):
            raise self._fail("unsupported pcap version %d.%d (libpcap reads 2.0 to 2.4)"
                             % (major, minor))
        src.pos += 24
        # Before 2.3 (and in 543.0) the captured and original lengths were
        # stored the other way round; 2.3 files exist in both orders.
        if major == 543 or minor < 3:
            self._pcap_swap = "always"
        elif minor == 3:
            self._pcap_swap = "maybe"
        self._pcap_order = order
        self._pcap_frac_ns = frac_ns
        self._pcap_hdr_len = hdr_len
        self.nanosecond = frac_ns == 1
        self.snaplen = snaplen
        # The upper 16 bits hold FCS-length flags (or fuzzer junk): not the type.
        self.linktype = linktype_field & 0xFFFF
        self._check_linktype()

    def _records(self) -> Iterator[tuple[int, int, bytes, int, int]]:
        src = self._src
        unpack_from = struct.Struct(self._pcap_order + "IIII").unpack_from
        hdr_len = self._pcap_hdr_len
        frac_ns = self._pcap_frac_ns
        swap = self._pcap_swap
        max_caplen = MAX_CAPLEN
        linktype = self.linktype
        buf = src.buf
        pos = src.pos
        end = len(buf)
        count = 0
        try:
            while True:
                if pos + hdr_len > end:
                    src.pos = pos
                    if not src.fill(hdr_len):
                        left = src.available()
                        if left:
                            self._stop("truncated record at packet %d (file ends %d %s into its header)"
                                       % (count + 1, left, "byte" if left == 1 else "bytes"))
                        return
                    buf = src.buf
                    pos = src.pos
                    end = len(buf)
                sec, frac, caplen, orig_len = unpack_from(buf, pos)
                if swap and (swap == "always" or caplen > orig_len):
                    caplen, orig_len = orig_len, caplen
                if caplen > max_caplen:
                    self._stop("corrupt record header at packet %d, offset %d "
                               "(captured length %d is above %d)"
                               % (count + 1, src.base + pos, caplen, max_caplen))
                    return
                start = pos + hdr_len
                stop = start + caplen
                if stop > end:
                    src.pos = pos
                    if not src.fill(hdr_len + caplen):
                        got = src.available() - hdr_len
                        self._stop("truncated record at packet %d (file ends %d of %d bytes into its data)"
                                   % (count + 1, got, caplen))
                        return
                    buf = src.buf
                    pos = src.pos
                    end = len(buf)
                    start = pos + hdr_len
                    stop = start + caplen
                count += 1
                self.packets = count
                yield count, sec * NS_PER_S + frac * frac_ns, buf[start:stop], orig_len, linktype
                pos = stop
        except OSError as exc:
            raise self._read_error(exc) from None
        except (struct.error, ValueError, IndexError, OverflowError) as exc:
            # Safety net only: every length is checked above.
            self._stop("internal parse error at packet %d (%s: %s)"
                       % (count + 1, type(exc).__name__, exc))
        finally:
            src.pos = pos
            self._finish()
            self._release()


class PcapWriter:
    """Classic pcap, little-endian, version 2.4, microsecond timestamps
    (``nano=True``: nanosecond magic)."""

    def __init__(self, fileobj: BinaryIO, *, linktype: int = LINKTYPE_ETHERNET,
                 snaplen: int = MAX_CAPLEN, nano: bool = False) -> None:
        self._write = fileobj.write
        self._name = output_name(fileobj)
        self._nano = nano
        self.snaplen = snaplen
        self.packets = 0
        self._record = struct.Struct("<IIII").pack
        magic = 0xA1B23C4D if nano else 0xA1B2C3D4
        self._write(struct.pack("<IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype))

    def write(self, ts_ns: int, data: bytes, orig_len: int | None = None) -> None:
        """One record; data beyond the header's snaplen is cut (orig_len keeps
        the full length), so the header stays true."""
        sec, frac_ns = divmod(check_ts_ns(ts_ns, self._name), NS_PER_S)
        if sec > 0xFFFFFFFF:
            raise TimestampError("%s: cannot write a frame dated past 2106, where pcap's clock "
                                 "ends (%d ns)" % (self._name, ts_ns))
        # Truncate, never round: rounding 1.9999999 s up gives usec 1000000.
        frac = frac_ns if self._nano else frac_ns // 1000
        if orig_len is None:
            orig_len = len(data)
        if self.snaplen and len(data) > self.snaplen:
            data = data[:self.snaplen]
        self._write(self._record(sec, frac, len(data), orig_len))
        self._write(data)
        self.packets += 1
