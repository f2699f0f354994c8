"""Reading and writing capture files: classic pcap and pcapng.

The reader is our own, struct-based, because dpkt's readers get real files
wrong (``shared/notes/capture-pitfalls.md``): they skip Simple Packet Blocks,
apply the first interface's time resolution to every interface, stop at a
second section of the other byte order, need ``seek`` to tell pcap from
pcapng (so ``-`` fails for pcapng), raise ``NeedData`` on a cut record header
and silently yield a short last record when the data is cut.

Contract of :func:`open_capture` and :class:`CaptureReader`:

* everything wrong with a file *before its first packet can be read* (cannot
  open it, not a capture, unsupported version, header cut short, a link type
  that is not read) raises :class:`CaptureError` from :func:`open_capture`,
  with a one-line message that starts with the file's display name;
* iteration never raises for any byte content: a truncated or corrupt tail
  stops the iteration cleanly and leaves a one-line warning in
  ``reader.warnings``; only an I/O error while reading raises CaptureError;
* timestamps are integer nanoseconds (never floats), records stream out of
  a bounded buffer (one 1 MiB chunk plus at most one record or block).

Compressed captures are recognised by their magic bytes, like the formats,
and decompressed as they are read (never whole): gzip with the standard
library, zstd (Wireshark's ``.pcapng.zst``) with the ``zstandard`` package
when it is installed.  A compressed stream that is cut short or corrupt ends
the capture like a damaged tail: a warning, and what was read is compared.

Acceptance rules follow libpcap (``sf-pcap.c``, ``sf-pcapng.c``): pcap
versions 2.0-2.4 and DG/UX's 543.0, with the captured/original length fields
swapped as libpcap swaps them for versions before 2.3; pcapng sections of
version 1.0 and 1.2.  A record above :data:`MAX_CAPLEN` bytes, or a pcapng
block above :data:`MAX_BLOCK_LEN`, is corruption, never an allocation.

The writers build every header themselves: dpkt's pcap writer records
``tv_usec = 1000000`` for 1.9999999 s and claims a snaplen of 1500, and its
pcapng writer only knows microseconds.
"""

from __future__ import annotations

import operator
import os
import struct
import sys
import zlib
from typing import BinaryIO, Iterator

from .errors import ColoError, os_error_text
from .linklayer import LINKTYPES_READ

__all__ = [
    "CaptureError",
    "CaptureReader",
    "LINKTYPE_ETHERNET",
    "LINKTYPES_READ",
    "LINKTYPE_NAMES",
    "MAX_BLOCK_LEN",
    "MAX_CAPLEN",
    "PcapWriter",
    "LikeInputWriter",
    "PcapngWriter",
    "describe_linktype",
    "open_capture",
]

LINKTYPE_ETHERNET = 1

#: libpcap's MAXIMUM_SNAPLEN: no link type we read has a longer record, so a
#: longer captured length is a damaged (or hostile) header.
MAX_CAPLEN = 262144

#: libpcap's ceiling for one pcapng block (sf-pcapng.c, MAX_BLOCKSIZE).
MAX_BLOCK_LEN = 16 * 1024 * 1024

#: Read size; big enough that per-read overhead vanishes, small enough that
#: memory does not depend on the capture's size.
CHUNK_BYTES = 1 << 20

#: LINKTYPE_* names as tcpdump.org lists them (the values stored in files;
#: they differ from the DLT_* values of some operating systems, which is why
#: dpkt's DLT_* constants are not used here).
LINKTYPE_NAMES = {
    0: "NULL",
    1: "ETHERNET",
    3: "AX25",
    6: "IEEE802_5",
    7: "ARCNET_BSD",
    8: "SLIP",
    9: "PPP",
    10: "FDDI",
    # Some writers store their OS's DLT_RAW value (12, or 14 on OpenBSD).
    12: "RAW",
    14: "RAW",
    50: "PPP_HDLC",
    51: "PPP_ETHER",
    100: "ATM_RFC1483",
    101: "RAW",
    104: "C_HDLC",
    105: "IEEE802_11",
    107: "FRELAY",
    108: "LOOP",
    113: "LINUX_SLL",
    114: "LTALK",
    117: "PFLOG",
    119: "IEEE802_11_PRISM",
    122: "IP_OVER_FC",
    123: "SUNATM",
    127: "IEEE802_11_RADIOTAP",
    129: "ARCNET_LINUX",
    138: "APPLE_IP_OVER_IEEE1394",
    139: "MTP2_WITH_PHDR",
    140: "MTP2",
    141: "MTP3",
    142: "SCCP",
    143: "DOCSIS",
    144: "LINUX_IRDA",
    **{147 + i: "USER%d" % i for i in range(16)},
    163: "IEEE802_11_AVS",
    165: "BACNET_MS_TP",
    166: "PPP_PPPD",
    169: "GPRS_LLC",
    177: "LINUX_LAPD",
    187: "BLUETOOTH_HCI_H4",
    189: "USB_LINUX",
    192: "PPI",
    195: "IEEE802_15_4_WITHFCS",
    196: "SITA",
    197: "ERF",
    201: "BLUETOOTH_HCI_H4_WITH_PHDR",
    202: "AX25_KISS",
    203: "LAPD",
    204: "PPP_WITH_DIR",
    205: "C_HDLC_WITH_DIR",
    206: "FRELAY_WITH_DIR",
    209: "IPMB_LINUX",
    215: "IEEE802_15_4_NONASK_PHY",
    220: "USB_LINUX_MMAPPED",
    224: "FC_2",
    225: "FC_2_WITH_FRAME_DELIMS",
    226: "IPNET",
    227: "CAN_SOCKETCAN",
    228: "IPV4",
    229: "IPV6",
    230: "IEEE802_15_4_NOFCS",
    231: "DBUS",
    235: "DVB_CI",
    236: "MUX27010",
    237: "STANAG_5066_D_PDU",
    239: "NFLOG",
    240: "NETANALYZER",
    241: "NETANALYZER_TRANSPARENT",
    242: "IPOIB",
    243: "MPEG_2_TS",
    244: "NG40",
    245: "NFC_LLCP",
    247: "INFINIBAND",
    248: "SCTP",
    249: "USBPCAP",
    250: "RTAC_SERIAL",
    251: "BLUETOOTH_LE_LL",
    253: "NETLINK",
    254: "BLUETOOTH_LINUX_MONITOR",
    255: "BLUETOOTH_BREDR_BB",
    256: "BLUETOOTH_LE_LL_WITH_PHDR",
    257: "PROFIBUS_DL",
    258: "PKTAP",
    259: "EPON",
    260: "IPMI_HPM_2",
    261: "ZWAVE_R1_R2",
    262: "ZWAVE_R3",
    263: "WATTSTOPPER_DLM",
    264: "ISO_14443",
    265: "RDS",
    266: "USB_DARWIN",
    268: "SDLC",
    270: "LORATAP",
    271: "VSOCK",
    272: "NORDIC_BLE",
    273: "DOCSIS31_XRA31",
    274: "ETHERNET_MPACKET",
    275: "DISPLAYPORT_AUX",
    276: "LINUX_SLL2",
    278: "OPENVIZSLA",
    279: "EBHSCR",
    280: "VPP_DISPATCH",
    281: "DSA_TAG_BRCM",
    282: "DSA_TAG_BRCM_PREPEND",
    283: "IEEE802_15_4_TAP",
    284: "DSA_TAG_DSA",
    285: "DSA_TAG_EDSA",
    286: "ELEE",
    287: "Z_WAVE_SERIAL",
    288: "USB_2_0",
    289: "ATSC_ALP",
    290: "ETW",
}


def describe_linktype(linktype: int) -> str:
    """'LINUX_SLL (113)', or just '147' for a number without a name."""
    name = LINKTYPE_NAMES.get(linktype)
    return "%s (%d)" % (name, linktype) if name else str(linktype)


class CaptureError(ColoError):
    """Unreadable capture.

    ``str(e)`` is one line that starts with the capture's display name, e.g.
    ``primary.pcap: not a pcap or pcapng file (first bytes 7f454c46)``.
    """


class _Damage(Exception):
    """A structural problem at a known place; becomes CaptureError before the
    first packet and a warning after it."""


# --------------------------------------------------------------- formats

# magic (as stored) -> (struct byte order, ns per fraction unit, record header bytes)
_PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1000, 16),
    b"\xa1\xb2\xc3\xd4": (">", 1000, 16),
    b"\x4d\x3c\xb2\xa1": ("<", 1, 16),
    b"\xa1\xb2\x3c\x4d": (">", 1, 16),
    # Alexey Kuznetzov's "modified pcap": 8 more bytes per record header
    # (ifindex, protocol, pkt_type, pad), microsecond timestamps.
    b"\x34\xcd\xb2\xa1": ("<", 1000, 24),
    b"\xa1\xb2\xcd\x34": (">", 1000, 24),
}
_PCAPNG_SHB_MAGIC = b"\x0a\x0d\x0d\x0a"
_PCAPNG_BOM = {b"\x4d\x3c\x2b\x1a": "<", b"\x1a\x2b\x3c\x4d": ">"}

# Compressions read (decompressed as the file is read).
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

# Common formats a capture arrives wrapped in; named in the error as a hint.
_WRAPPER_MAGICS = {
    b"\x1f\x8b": "gzip-compressed",
    b"BZh": "bzip2-compressed",
    b"\xfd7zXZ": "xz-compressed",
    b"\x28\xb5\x2f\xfd": "zstd-compressed",
}

_BT_SHB = 0x0A0D0D0A
_BT_IDB = 1
_BT_PB = 2  # obsolete Packet Block
_BT_SPB = 3
_BT_EPB = 6
#: Blocks that carry no packet for us but that Wireshark shows as frames of
#: their own (custom blocks, either copy flag, and systemd journal export
#: blocks): they take a frame number, so ours stay Wireshark's.
_BT_FRAME_NUMBERED = frozenset((0x00000BAD, 0x40000BAD, 0x00000009))
_BLOCK_NAMES = {
    _BT_SHB: "Section Header Block",
    _BT_IDB: "Interface Description Block",
    _BT_PB: "Packet Block",
    _BT_SPB: "Simple Packet Block",
    4: "Name Resolution Block",
    5: "Interface Statistics Block",
    _BT_EPB: "Enhanced Packet Block",
    10: "Decryption Secrets Block",
}
# Smallest legal total length per block type (header, fixed fields, trailer).
_BLOCK_MIN_LEN = {_BT_SHB: 28, _BT_IDB: 20, _BT_PB: 32, _BT_SPB: 16, _BT_EPB: 32}

_OPT_ENDOFOPT = 0
_OPT_COMMENT = 1
_SHB_USERAPPL = 4
_IF_NAME = 2
_IF_DESCRIPTION = 3
_IF_TSRESOL = 9
_IF_TSOFFSET = 14

_NS_PER_S = 1_000_000_000


class _Structs:
    """Pre-compiled structs for one byte order."""

    def __init__(self, e: str) -> None:
        self.u16x2 = struct.Struct(e + "HH").unpack_from
        self.u32 = struct.Struct(e + "I").unpack_from
        self.u32x2 = struct.Struct(e + "II").unpack_from
        self.idb = struct.Struct(e + "HHI").unpack_from
        self.epb = struct.Struct(e + "IIIII").unpack_from
        self.pb = struct.Struct(e + "HHIIII").unpack_from
        self.i64 = struct.Struct(e + "q").unpack_from


_STRUCTS = {"<": _Structs("<"), ">": _Structs(">")}


def _block_name(btype: int) -> str:
    return _BLOCK_NAMES.get(btype) or "block of type 0x%08x" % btype


def _plural(n: int, word: str) -> str:
    return "%d %s%s" % (n, word, "" if n == 1 else "s")


# ---------------------------------------------------------------- source

class _Source:
    """Chunked reading without seek, so pipes and stdin work.

    ``buf[pos:]`` is data not consumed yet; ``base`` is the file offset of
    ``buf[0]``.
    """

    __slots__ = ("_read", "buf", "pos", "base", "eof")

    def __init__(self, fileobj: BinaryIO) -> None:
        # read1 returns what is there instead of blocking for a whole chunk,
        # so a live pipe ("tcpdump -w - | ...") is not held back by 1 MiB.
        self._read = getattr(fileobj, "read1", None) or fileobj.read
        self.buf = b""
        self.pos = 0
        self.base = 0
        self.eof = False

    def available(self) -> int:
        return len(self.buf) - self.pos

    def offset(self) -> int:
        return self.base + self.pos

    def fill(self, need: int) -> bool:
        """Make ``buf[pos:pos + need]`` available; False if the file ends first."""
        have = len(self.buf) - self.pos
        if have >= need:
            return True
        parts = [self.buf[self.pos:]] if have else []
        self.base += self.pos
        self.pos = 0
        while have < need and not self.eof:
            chunk = self._read(max(CHUNK_BYTES, need - have))
            if not chunk:
                self.eof = True
                break
            parts.append(chunk)
            have += len(chunk)
        self.buf = b"".join(parts)
        return have >= need


# ---------------------------------------------------------------- reader

class CaptureReader:
    """A capture opened by :func:`open_capture`; iterate it once for
    ``(frame_number, ts_ns, data, orig_len, linktype)`` tuples in file order.

    ``frame_number`` is the record's number as Wireshark and tshark give it:
    1 for the first packet record of the file, counting every packet record
    in file order (pcapng: across sections and interfaces, including those
    of interfaces that are skipped), so a report can name the very frame a
    user opens in Wireshark.  ``linktype`` is the record's own link type (a
    pcapng's interfaces may differ).

    ``name`` is the display name (``<stdin>`` for ``-``); ``format`` is
    ``'pcap'`` or ``'pcapng'``; ``linktype``, ``snaplen`` and ``nanosecond``
    describe the file (pcap) or its first interface (pcapng; ``linktype`` is
    None for a pcapng that defines no interface, which has no packets either).
    ``packets`` counts records yielded so far; ``warnings`` collects one-line
    messages (damaged tail, skipped non-Ethernet interfaces), complete once
    iteration has ended or the reader is closed.
    """

    name: str
    format: str
    linktype: int | None
    nanosecond: bool
    snaplen: int
    warnings: list[str]
    packets: int

    def __init__(self, name: str, fileobj: BinaryIO, owns_file: bool,
                 linktypes=LINKTYPES_READ) -> None:
        self.name = name
        self.format = ""
        self.linktype = None
        self.nanosecond = False
        self.snaplen = 0
        self.warnings = []
        self.packets = 0
        self._file = fileobj
        self._owns_file = owns_file
        self._linktypes = linktypes
        self._src = _Source(fileobj)
        self._unpack = None     # a compressed file's decompressor (_Decompressor)
        self.compression = ""   # "gzip", "zstd" or ""
        self._gen: Iterator | None = None
        self._closed = False
        self._finished = False
        # pcap
        self._pcap_order = "<"
        self._pcap_frac_ns = 1000
        self._pcap_hdr_len = 16
        self._pcap_swap = ""  # "", "always" or "maybe" (libpcap's lengths_swapped)
        # pcapng: per-section state
        self._ng_structs = _STRUCTS["<"]
        self._ng_section = 0
        self._ng_ifaces: list[tuple] = []
        self._ng_numbered = 0   # frame-numbered blocks read before the first IDB
        self._ng_skipped: dict[tuple[int, int], list[int]] = {}

    # -- public -----------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[int, int, bytes, int, int]]:
        if self._gen is None:
            if self._closed:
                return iter(())
            self._gen = (self._pcap_records() if self.format == "pcap"
                         else self._pcapng_records())
        return self._gen

    @property
    def bytes_read(self) -> int:
        """Bytes read from the file so far (to the chunk; compressed bytes for
        a compressed file): for progress bars."""
        if self._unpack is not None:
            return self._unpack.consumed
        return self._src.base + len(self._src.buf)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._gen is not None:
            self._gen.close()
        self._finish()
        self._release()

    def __enter__(self) -> CaptureReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return "<CaptureReader %s %s linktype=%s packets=%d>" % (
            self.name, self.format, self.linktype, self.packets)

    # -- shared helpers -----------------------------------------------------

    def _fail(self, msg: str) -> CaptureError:
        return CaptureError("%s: %s" % (self.name, msg))

    def _stop(self, what: str) -> None:
        """Record why iteration ends early.  When the decompressor ran into
        damage, that is the reason (the cut record it leaves is a symptom)."""
        if self._unpack is not None and self._unpack.damage:
            if self._unpack.reported:
                return
            what = self._unpack.damage
            self._unpack.reported = True
        n = self.packets
        self.warnings.append("%s: %s; compared the %s before it"
                             % (self.name, what, _plural(n, "packet")))

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self._unpack is not None and self._unpack.damage:
            # the decompressed data ended cleanly between records
            self._stop(self._unpack.damage)
        for (section, iface), (count, linktype) in self._ng_skipped.items():
            where = "interface %d" % iface
            if self._ng_section > 1:
                where += " of section %d" % section
            self.warnings.append(
                "%s: skipped %s on %s (link type %s, not one colo-compare reads)"
                % (self.name, _plural(count, "packet"), where, describe_linktype(linktype)))

    def _release(self) -> None:
        if self._owns_file:
            try:
                self._file.close()
            except OSError:
                pass

    def _read_error(self, exc: OSError) -> CaptureError:
        return self._fail("read error after %s: %s"
                          % (_plural(self.packets, "packet"), os_error_text(exc)))

    def _check_linktype(self) -> None:
        if (self._linktypes is not None and self.linktype is not None
                and self.linktype not in self._linktypes):
            raise self._fail("link type %s is not one colo-compare reads (it reads %s)"
                             % (describe_linktype(self.linktype), _describe_read()))

    # -- pcap -----------------------------------------------------------------

    def _open_pcap(self, magic: bytes) -> None:
        order, frac_ns, hdr_len = _PCAP_MAGICS[magic]
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
        self.format = "pcap"
        self._pcap_order = order
        self._pcap_frac_ns = frac_ns
        self._pcap_hdr_len = hdr_len
        self.nanosecond = frac_ns == 1
        self.snaplen = snaplen
        # The upper 16 bits hold FCS-length flags (or fuzzer junk): not the type.
        self.linktype = linktype_field & 0xFFFF
        self._check_linktype()

    def _pcap_records(self) -> Iterator[tuple[int, int, bytes, int, int]]:
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
                yield count, sec * _NS_PER_S + frac * frac_ns, buf[start:stop], orig_len, linktype
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

    # -- pcapng ---------------------------------------------------------------

    def _open_pcapng(self) -> None:
        self.format = "pcapng"
        # Read up to the first Interface Description Block: it fixes linktype,
        # snaplen and nanosecond.  No packet can come before it.
        try:
            while not self._ng_ifaces:
                block = self._ng_next_block()
                if block is None:
                    break  # valid: a file with no interfaces has no packets
                btype, buf, at, blen, offset = block
                if btype == _BT_SHB or btype == _BT_IDB:
                    self._ng_meta_block(btype, buf, at, blen, offset)
                elif btype in (_BT_EPB, _BT_PB, _BT_SPB):
                    raise _Damage("%s at offset %d comes before any Interface Description Block"
                                  % (_block_name(btype), offset))
                elif btype in _BT_FRAME_NUMBERED:
                    self._ng_numbered += 1
        except _Damage as exc:
            raise self._fail(str(exc)) from None
        except OSError as exc:
            raise self._fail("read error: %s" % os_error_text(exc)) from None
        self._check_linktype()

    def _ng_next_block(self) -> tuple | None:
        """The next whole block as (type, buffer, start in buffer, length,
        file offset); None at a clean end of file."""
        src = self._src
        offset = src.offset()
        if not src.fill(8):
            left = src.available()
            if left == 0:
                return None
            raise _Damage("truncated block header at offset %d (file ends %d bytes into it)"
                          % (offset, left))
        buf, at = src.buf, src.pos
        if buf[at:at + 4] == _PCAPNG_SHB_MAGIC:
            # A new section may switch byte order; its length is in that order.
            if not src.fill(12):
                raise _Damage("truncated Section Header Block at offset %d (file ends %d bytes into it)"
                              % (offset, src.available()))
            buf, at = src.buf, src.pos
            order = _PCAPNG_BOM.get(buf[at + 8:at + 12])
            if order is None:
                raise _Damage("Section Header Block at offset %d has a bad byte-order magic (%s)"
                              % (offset, buf[at + 8:at + 12].hex()))
            self._ng_structs = _STRUCTS[order]
        btype, blen = self._ng_structs.u32x2(buf, at)
        if blen % 4 or blen < _BLOCK_MIN_LEN.get(btype, 12) or blen > MAX_BLOCK_LEN:
            raise _Damage("corrupt %s at offset %d (block length %d)"
                          % (_block_name(btype), offset, blen))
        if not src.fill(blen):
            raise _Damage("truncated %s at offset %d (file ends %d of %d bytes into it)"
                          % (_block_name(btype), offset, src.available(), blen))
        buf, at = src.buf, src.pos
        (trailer,) = self._ng_structs.u32(buf, at + blen - 4)
        if trailer != blen:
            raise _Damage("corrupt %s at offset %d (trailing length %d, leading length %d)"
                          % (_block_name(btype), offset, trailer, blen))
        src.pos = at + blen
        return btype, buf, at, blen, offset

    def _ng_options(self, buf: bytes, start: int, stop: int):
        """(code, value) pairs of an options area; a malformed tail ends the
        list (the block itself was already validated by its lengths)."""
        u16x2 = self._ng_structs.u16x2
        pos = start
        while pos + 4 <= stop:
            code, length = u16x2(buf, pos)
            if code == _OPT_ENDOFOPT:
                return
            value_end = pos + 4 + length
            if value_end > stop:
                return
            yield code, buf[pos + 4:value_end]
            pos = value_end + (-length % 4)

    def _ng_meta_block(self, btype: int, buf: bytes, at: int, blen: int, offset: int) -> None:
        S = self._ng_structs
        if btype == _BT_SHB:
            major, minor = S.u16x2(buf, at + 12)
            # libpcap reads 1.0 and 1.2 (1.2 is written by some tools and is
            # otherwise identical); the spec says to skip other sections, but
            # a comparison must not silently lose part of a capture.
            if not (major == 1 and minor in (0, 2)):
                where = " in the section at offset %d" % offset if offset else ""
                raise _Damage("unsupported pcapng version %d.%d%s (libpcap reads 1.0 and 1.2)"
                              % (major, minor, where))
            self._ng_section += 1
            self._ng_ifaces = []
            return
        # Interface Description Block
        linktype, _reserved, snaplen = S.idb(buf, at + 8)
        tsresol = 6
        offset_ns = 0
        for code, value in self._ng_options(buf, at + 16, at + blen - 4):
            if code == _IF_TSRESOL and len(value) >= 1:
                tsresol = value[0]
            elif code == _IF_TSOFFSET and len(value) == 8:
                offset_ns = S.i64(value, 0)[0] * _NS_PER_S
        # ts_ns = ticks * mul // div + offset_ns, exactly, in integers.
        if tsresol & 0x80:
            mul, div = _NS_PER_S, 1 << (tsresol & 0x7F)
            finer_than_us = (tsresol & 0x7F) >= 20  # 2^-20 s < 1 µs
        else:
            exp = tsresol
            mul, div = (10 ** (9 - exp), 1) if exp <= 9 else (1, 10 ** (exp - 9))
            finer_than_us = exp > 6
        if self._linktypes is None or linktype in self._linktypes:
            skip_key = None
        else:
            skip_key = (self._ng_section, len(self._ng_ifaces))
        self._ng_ifaces.append((linktype, snaplen, mul, div, offset_ns, skip_key))
        if self.linktype is None:
            self.linktype = linktype
            self.snaplen = snaplen
            self.nanosecond = finer_than_us

    def _ng_skip(self, iface: tuple) -> None:
        entry = self._ng_skipped.get(iface[5])
        if entry is None:
            self._ng_skipped[iface[5]] = [1, iface[0]]
        else:
            entry[0] += 1

    def _pcapng_records(self) -> Iterator[tuple[int, int, bytes, int, int]]:
        next_block = self._ng_next_block
        max_caplen = MAX_CAPLEN
        count = 0
        # Wireshark's frame number: skipped packets count too, and so do the
        # blocks it shows as frames (those before the first IDB included)
        number = self._ng_numbered
        offset = self._src.offset()
        try:
            while True:
                block = next_block()
                if block is None:
                    return
                btype, buf, at, blen, offset = block
                if btype == _BT_EPB or btype == _BT_PB:
                    if btype == _BT_EPB:
                        ifid, ts_hi, ts_lo, caplen, orig_len = self._ng_structs.epb(buf, at + 8)
                    else:
                        ifid, _drops, ts_hi, ts_lo, caplen, orig_len = self._ng_structs.pb(buf, at + 8)
                    ifaces = self._ng_ifaces
                    if ifid >= len(ifaces):
                        self._stop("corrupt %s at offset %d (interface %d, but the section "
                                   "defines %s)" % (_block_name(btype), offset, ifid,
                                                    _plural(len(ifaces), "interface")))
                        return
                    if caplen > blen - 32 or caplen > max_caplen:
                        self._stop("corrupt %s at offset %d (captured length %d in a %d-byte block)"
                                   % (_block_name(btype), offset, caplen, blen))
                        return
                    linktype, _snaplen, mul, div, offset_ns, skip_key = iface = ifaces[ifid]
                    number += 1
                    if skip_key is not None:
                        self._ng_skip(iface)
                        continue
                    count += 1
                    self.packets = count
                    yield (number, (ts_hi << 32 | ts_lo) * mul // div + offset_ns,
                           buf[at + 28:at + 28 + caplen], orig_len, linktype)
                elif btype == _BT_SPB:
                    ifaces = self._ng_ifaces
                    if not ifaces:
                        self._stop("corrupt Simple Packet Block at offset %d (the section "
                                   "defines no interface)" % offset)
                        return
                    iface = ifaces[0]
                    (orig_len,) = self._ng_structs.u32(buf, at + 8)
                    # No captured length in an SPB: it is the original length,
                    # cut to the block and to the interface's snaplen (0: none).
                    caplen = min(orig_len, blen - 16)
                    if iface[1]:
                        caplen = min(caplen, iface[1])
                    if caplen > max_caplen:
                        self._stop("corrupt Simple Packet Block at offset %d (captured length %d)"
                                   % (offset, caplen))
                        return
                    number += 1
                    if iface[5] is not None:
                        self._ng_skip(iface)
                        continue
                    count += 1
                    self.packets = count
                    # An SPB has no timestamp; libpcap reports 0 too.
                    yield number, 0, buf[at + 12:at + 12 + caplen], orig_len, iface[0]
                elif btype == _BT_SHB or btype == _BT_IDB:
                    self._ng_meta_block(btype, buf, at, blen, offset)
                elif btype in _BT_FRAME_NUMBERED:
                    number += 1
                # Anything else (NRB, ISB, DSB, unknown) carries no packet.
        except _Damage as exc:
            self._stop(str(exc))
        except OSError as exc:
            raise self._read_error(exc) from None
        except (struct.error, ValueError, IndexError, OverflowError) as exc:
            # Safety net only: every length is checked before it is used.
            self._stop("internal parse error near offset %d (%s: %s)"
                       % (offset, type(exc).__name__, exc))
        finally:
            self._finish()
            self._release()


def _not_a_capture(first: bytes, compression: str = "") -> str:
    if compression:
        return "not a pcap or pcapng file (%s-compressed; decompressed, its first bytes are %s)" % (
            compression, first.hex())
    for magic, what in _WRAPPER_MAGICS.items():
        if first.startswith(magic):
            return "not a pcap or pcapng file (first bytes %s: looks %s; decompress it first)" % (
                first.hex(), what)
    return "not a pcap or pcapng file (first bytes %s)" % first.hex()


def _describe_read() -> str:
    from .linklayer import describe_read
    return describe_read()


# ----------------------------------------------------------- decompression

class _Prefixed:
    """A file's bytes again from the start, without seek: the part already
    read (to sniff it), then the rest of the file.  Counts what it gives."""

    def __init__(self, head: bytes, fileobj: BinaryIO) -> None:
        self._head = head
        self._read = getattr(fileobj, "read1", None) or fileobj.read
        self.consumed = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = CHUNK_BYTES
        if self._head:
            data, self._head = self._head[:n], self._head[n:]
        else:
            data = self._read(n)
        self.consumed += len(data)
        return data

    read1 = read


class _Decompressor:
    """Decompresses as it is read, never the whole file at once.  A stream
    that is cut short or corrupt ends (EOF) and leaves a one-line
    ``damage``; read errors of the file itself still raise OSError."""

    def __init__(self, compression: str, raw: _Prefixed) -> None:
        self.compression = compression
        self._raw = raw
        self.damage = ""
        self.reported = False
        if compression == "gzip":
            import gzip
            self._gzip = gzip.GzipFile(fileobj=raw, mode="rb")
            self._errors = (EOFError, zlib.error, gzip.BadGzipFile)
        else:
            import zstandard
            self._zstd = zstandard.ZstdDecompressor()
            self._frame = self._zstd.decompressobj()
            self._in_frame = False          # bytes of an unfinished frame were given
            self._pending = memoryview(b"")
            self._errors = (zstandard.ZstdError,)

    @property
    def consumed(self) -> int:
        return self._raw.consumed

    def read1(self, n: int) -> bytes:
        if self.damage:
            return b""
        try:
            if self.compression == "gzip":
                return self._gzip.read1(n)
            return self._zstd_read(n)
        except EOFError:
            self.damage = "%s data cut short (the file ends inside the compressed stream)" % (
                self.compression)
        except self._errors as exc:
            self.damage = "corrupt %s data (%s)" % (self.compression, exc)
        return b""

    read = read1

    #: compressed bytes given to zstd at once.  Its output is not bounded by
    #: the call (a block can expand 32768 times), so the input is: at most
    #: 32 MiB out per step.
    _ZSTD_STEP = 1024

    def _zstd_read(self, n: int) -> bytes:
        # zstandard's stream reader says nothing when a file ends inside a
        # frame; a decompressobj per frame tells (its ``eof``), and takes
        # concatenated and skippable frames (pzstd) one after the other.
        while not self._pending:
            chunk = self._raw.read(self._ZSTD_STEP)
            if not chunk:
                if self._in_frame:
                    raise EOFError
                return b""
            outs = []
            while chunk:
                outs.append(self._frame.decompress(chunk))
                self._in_frame = True
                chunk = b""
                if self._frame.eof:
                    chunk = self._frame.unused_data
                    self._frame = self._zstd.decompressobj()
                    self._in_frame = False
            self._pending = memoryview(b"".join(outs))
        data = self._pending[:n].tobytes()
        self._pending = self._pending[n:]
        return data


def _start_decompressing(reader: "CaptureReader", compression: str) -> None:
    """Read the rest of ``reader``'s file through a decompressor."""
    if compression == "zstd":
        try:
            import zstandard  # noqa: F401
        except ImportError:
            raise reader._fail("zstd-compressed: reading it needs the Python package 'zstandard' "
                               "(pip install zstandard), or decompress it first (zstd -d)") from None
    src = reader._src
    unpack = _Decompressor(compression, _Prefixed(src.buf[src.pos:], reader._file))
    reader._unpack = unpack
    reader.compression = compression
    reader._src = _Source(unpack)


def open_capture(path: str, *, linktypes=LINKTYPES_READ,
                 stdin: BinaryIO | None = None) -> CaptureReader:
    """Open a pcap or pcapng capture (``'-'``: read ``stdin``, default
    ``sys.stdin.buffer``), gzip- or zstd-compressed or not.

    The format and compression come from the first bytes, never from the
    name.  A capture whose (first) interface has a link type not in
    ``linktypes`` (default: those colo-compare reads; None: any) is refused,
    and in pcapng the packets of later interfaces of such a link type are
    skipped and counted in one warning per interface.
    """
    path = os.fspath(path)
    if path == "-":
        name = "<stdin>"
        fileobj = stdin if stdin is not None else sys.stdin.buffer
        owns_file = False
    else:
        name = path
        try:
            # Unbuffered: _Source does its own chunking, and a second buffer
            # would only copy every byte once more.
            fileobj = open(path, "rb", buffering=0)
        except OSError as exc:
            raise CaptureError("%s: cannot open: %s" % (name, os_error_text(exc))) from None
        owns_file = True
    reader = CaptureReader(name, fileobj, owns_file, linktypes)
    try:
        try:
            _open_format(reader)
        except CaptureError:
            # a header cut short by a damaged compressed stream: say so
            if reader._unpack is not None and reader._unpack.damage:
                raise reader._fail(reader._unpack.damage) from None
            raise
    except BaseException:
        reader._release()
        raise
    return reader


def _open_format(reader: CaptureReader) -> None:
    first = _sniff(reader)
    if first[:2] == _GZIP_MAGIC or first == _ZSTD_MAGIC:
        _start_decompressing(reader, "gzip" if first[:2] == _GZIP_MAGIC else "zstd")
        first = _sniff(reader)
        if not first:
            raise reader._fail("empty %s-compressed file, not a pcap or pcapng capture"
                               % reader.compression)
    elif not first:
        raise reader._fail("empty file (0 bytes), not a pcap or pcapng capture")
    if first in _PCAP_MAGICS:
        try:
            reader._open_pcap(first)
        except OSError as exc:
            raise reader._fail("cannot read: %s" % os_error_text(exc)) from None
    elif first == _PCAPNG_SHB_MAGIC:
        reader._open_pcapng()
    elif len(first) < 4:
        raise reader._fail("too short to be a capture (%d bytes: %s)" % (len(first), first.hex()))
    else:
        raise reader._fail(_not_a_capture(first, reader.compression))


def _sniff(reader: CaptureReader) -> bytes:
    src = reader._src
    try:
        src.fill(4)
    except OSError as exc:
        raise reader._fail("cannot read: %s" % os_error_text(exc)) from None
    return src.buf[src.pos:src.pos + 4]


# ---------------------------------------------------------------- writers

class TimestampError(CaptureError, ValueError):
    """A frame's time that the output format cannot store: before 1970, or
    past its end (2106 for pcap, 2554 for pcapng).  A capture can hold such
    times (pcapng's if_tsoffset) that its output cannot: a one-line error
    naming the output, not an internal error."""


def _output_name(fileobj) -> str:
    name = getattr(fileobj, "name", None)
    return name if isinstance(name, str) else "output"


def _check_ts_ns(ts_ns, name: str = "output") -> int:
    # operator.index refuses floats: a float cannot hold epoch nanoseconds.
    ts_ns = operator.index(ts_ns)
    if ts_ns < 0:
        raise TimestampError("%s: cannot write a frame dated before 1970 (%d ns)" % (name, ts_ns))
    return ts_ns


class PcapWriter:
    """Classic pcap, little-endian, version 2.4, microsecond timestamps
    (``nano=True``: nanosecond magic)."""

    def __init__(self, fileobj: BinaryIO, *, linktype: int = LINKTYPE_ETHERNET,
                 snaplen: int = MAX_CAPLEN, nano: bool = False) -> None:
        self._write = fileobj.write
        self._name = _output_name(fileobj)
        self._nano = nano
        self.snaplen = snaplen
        self.packets = 0
        self._record = struct.Struct("<IIII").pack
        magic = 0xA1B23C4D if nano else 0xA1B2C3D4
        self._write(struct.pack("<IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype))

    def write(self, ts_ns: int, data: bytes, orig_len: int | None = None) -> None:
        """One record; data beyond the header's snaplen is cut (orig_len keeps
        the full length), so the header stays true."""
        sec, frac_ns = divmod(_check_ts_ns(ts_ns, self._name), _NS_PER_S)
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


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _option(code: int, value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError("pcapng option %d too long (%d bytes)" % (code, len(value)))
    return struct.pack("<HH", code, len(value)) + value + _pad4(len(value))


_END_OF_OPTIONS = struct.pack("<HH", _OPT_ENDOFOPT, 0)


def _options(items: list[tuple[int, bytes]]) -> bytes:
    if not items:
        return b""
    return b"".join(_option(code, value) for code, value in items) + _END_OF_OPTIONS


def _utf8_option_value(text: str) -> bytes:
    """UTF-8, cut on a character boundary to the 65535 bytes an option holds."""
    raw = text.encode("utf-8")
    if len(raw) > 0xFFFF:
        raw = raw[:0xFFFF].decode("utf-8", "ignore").encode("utf-8")
    return raw


class PcapngWriter:
    """pcapng, little-endian, one section; nanosecond interfaces, per-packet
    comments.  Meant for evidence files that open in Wireshark."""

    def __init__(self, fileobj: BinaryIO, *, application: str = "colo-compare",
                 comment: str | None = None) -> None:
        self._write = fileobj.write
        self._name = _output_name(fileobj)
        self._ifaces: list[int] = []  # snaplen per interface id
        self.packets = 0
        # Section length -1: not known in advance (the file is streamed).
        body = struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1)
        opts = [(_OPT_COMMENT, _utf8_option_value(comment))] if comment is not None else []
        body += _options(opts + [(_SHB_USERAPPL, _utf8_option_value(application))])
        self._block(_BT_SHB, body)

    def _block(self, btype: int, body: bytes) -> None:
        total = 12 + len(body)
        self._write(struct.pack("<II", btype, total) + body + struct.pack("<I", total))

    def add_interface(self, name: str, linktype: int = LINKTYPE_ETHERNET,
                      snaplen: int = MAX_CAPLEN, description: str | None = None) -> int:
        """Write an Interface Description Block; returns its interface id."""
        opts = [(_IF_NAME, _utf8_option_value(name))]
        if description is not None:
            opts.append((_IF_DESCRIPTION, _utf8_option_value(description)))
        opts.append((_IF_TSRESOL, b"\x09"))  # 10^-9 s: ts_ns is written as is
        self._block(_BT_IDB, struct.pack("<HHI", linktype, 0, snaplen) + _options(opts))
        self._ifaces.append(snaplen)
        return len(self._ifaces) - 1

    def write(self, iface: int, ts_ns: int, data: bytes, comment: str | None = None,
              orig_len: int | None = None) -> None:
        """One Enhanced Packet Block (with opt_comment when given)."""
        if not 0 <= iface < len(self._ifaces):
            raise ValueError("interface %d was not added" % iface)
        ts_ns = _check_ts_ns(ts_ns, self._name)
        if ts_ns >> 64:
            raise TimestampError("%s: cannot write a frame dated past 2554, where pcapng's "
                                 "nanoseconds end (%d ns)" % (self._name, ts_ns))
        if orig_len is None:
            orig_len = len(data)
        snaplen = self._ifaces[iface]
        if snaplen and len(data) > snaplen:
            data = data[:snaplen]
        opts = _options([(_OPT_COMMENT, _utf8_option_value(comment))] if comment is not None else [])
        head = struct.pack("<IIIII", iface, ts_ns >> 32, ts_ns & 0xFFFFFFFF, len(data), orig_len)
        self._block(_BT_EPB, head + data + _pad4(len(data)) + opts)
        self.packets += 1


class LikeInputWriter:
    """Frames written the way their capture holds them: a pcap under the
    capture's link type for a pcap; for a pcapng (whose interfaces may have
    several link types), a pcapng with one interface per link type met,
    each frame on its own.  ``write(ts_ns, data)``: a frame whose link type
    is not the capture's first carries it as a ``linktype`` attribute
    (``replay.LinkFrame``); plain bytes are of the first."""

    def __init__(self, fileobj: BinaryIO, *, format: str, linktype: int,
                 name: str = "primary") -> None:
        self.linktype = linktype
        self._name = name
        if format == "pcapng":
            self._ng = PcapngWriter(fileobj)
            self._ifaces = {linktype: self._ng.add_interface(name, linktype)}
            self._writer = self._ng
        else:
            # one link type: every frame is of it (a pcap cannot hold others)
            self._writer = PcapWriter(fileobj, linktype=linktype, nano=True)
            self.write = self._writer.write

    @property
    def packets(self) -> int:
        return self._writer.packets

    def write(self, ts_ns: int, data: bytes, orig_len: int | None = None) -> None:
        linktype = self.linktype if type(data) is bytes else getattr(data, "linktype", self.linktype)
        iface = self._ifaces.get(linktype)
        if iface is None:
            iface = self._ifaces[linktype] = self._ng.add_interface(self._name, linktype)
        self._ng.write(iface, ts_ns, data, orig_len=orig_len)
