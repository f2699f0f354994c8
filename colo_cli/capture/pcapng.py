"""pcapng: the reader and the writer.

Read as libpcap reads it (``sf-pcapng.c``), and as Wireshark numbers its
frames: sections of version 1.0 and 1.2, each in its own byte order;
Enhanced, Simple and the obsolete Packet Blocks; every interface with its
own link type, time resolution (``if_tsresol``) and offset
(``if_tsoffset``), timestamps computed in integers; packets on an interface
of a link type colo-compare does not read skipped and counted, one warning
per interface.  A block whose lengths disagree, or longer than
``MAX_BLOCK_LEN``, ends the file with a warning.  dpkt's reader does none of
this right (``docs/captures.md``).

The writer writes one little-endian section, nanosecond interfaces and
per-packet comments: evidence files that open in Wireshark, and replay's
outputs of a pcapng input.
"""

from __future__ import annotations

import struct
from typing import BinaryIO, Iterator

from ..errors import os_error_text
from .base import (MAX_CAPLEN, NS_PER_S, CaptureReader, TimestampError, check_ts_ns,
                   output_name, plural)
from .linktypes import LINKTYPE_ETHERNET, describe_linktype

#: libpcap's ceiling for one pcapng block (sf-pcapng.c, MAX_BLOCKSIZE).
MAX_BLOCK_LEN = 16 * 1024 * 1024

PCAPNG_SHB_MAGIC = b"\x0a\x0d\x0d\x0a"
_PCAPNG_BOM = {b"\x4d\x3c\x2b\x1a": "<", b"\x1a\x2b\x3c\x4d": ">"}

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


class _Damage(Exception):
    """A structural problem at a known place; becomes CaptureError before the
    first packet and a warning after it."""


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


class PcapngReader(CaptureReader):
    """A pcapng file (see :class:`~colo_cli.capture.base.CaptureReader`)."""

    format = "pcapng"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # per-section state
        self._ng_structs = _STRUCTS["<"]
        self._ng_section = 0
        self._ng_ifaces: list[tuple] = []
        self._ng_numbered = 0   # frame-numbered blocks read before the first IDB
        self._ng_skipped: dict[tuple[int, int], list[int]] = {}

    def start(self, magic: bytes) -> None:
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
        if buf[at:at + 4] == PCAPNG_SHB_MAGIC:
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
                offset_ns = S.i64(value, 0)[0] * NS_PER_S
        # ts_ns = ticks * mul // div + offset_ns, exactly, in integers.
        if tsresol & 0x80:
            mul, div = NS_PER_S, 1 << (tsresol & 0x7F)
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

    def _finish(self) -> None:
        if self._finished:
            return
        super()._finish()
        for (section, iface), (count, linktype) in self._ng_skipped.items():
            where = "interface %d" % iface
            if self._ng_section > 1:
                where += " of section %d" % section
            self.warnings.append(
                "%s: skipped %s on %s (link type %s, not one colo-compare reads)"
                % (self.name, plural(count, "packet"), where, describe_linktype(linktype)))

    def _records(self) -> Iterator[tuple[int, int, bytes, int, int]]:
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
                                                    plural(len(ifaces), "interface")))
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
        self._name = output_name(fileobj)
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
        ts_ns = check_ts_ns(ts_ns, self._name)
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
