"""Which format: a capture's, from its first bytes (:func:`open_capture`),
and the input's again for what replay writes (:class:`LikeInputWriter`).
"""

from __future__ import annotations

import os
import sys
from typing import BinaryIO

from ..errors import os_error_text
from ..linklayer import LINKTYPES_READ
from .base import CaptureError, CaptureReader, Source
from .compressed import GZIP_MAGIC, ZSTD_MAGIC, decompressing
from .pcap import PCAP_MAGICS, PcapReader, PcapWriter
from .pcapng import PCAPNG_SHB_MAGIC, PcapngReader, PcapngWriter

# Common formats a capture arrives wrapped in; named in the error as a hint.
_WRAPPER_MAGICS = {
    b"\x1f\x8b": "gzip-compressed",
    b"BZh": "bzip2-compressed",
    b"\xfd7zXZ": "xz-compressed",
    b"\x28\xb5\x2f\xfd": "zstd-compressed",
}


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
            # Unbuffered: Source does its own chunking, and a second buffer
            # would only copy every byte once more.
            fileobj = open(path, "rb", buffering=0)
        except OSError as exc:
            raise CaptureError("%s: cannot open: %s" % (name, os_error_text(exc))) from None
        owns_file = True
    unpack = None
    try:
        try:
            src = Source(fileobj)
            first = _sniff(name, src)
            if first[:2] == GZIP_MAGIC or first == ZSTD_MAGIC:
                compression = "gzip" if first[:2] == GZIP_MAGIC else "zstd"
                unpack, src = decompressing(name, compression, src, fileobj)
                first = _sniff(name, src)
                if not first:
                    raise CaptureError("%s: empty %s-compressed file, not a pcap or pcapng "
                                       "capture" % (name, compression))
            elif not first:
                raise CaptureError("%s: empty file (0 bytes), not a pcap or pcapng capture"
                                   % name)
            if first in PCAP_MAGICS:
                reader = PcapReader(name, fileobj, owns_file, linktypes, src, unpack)
                try:
                    reader.start(first)
                except OSError as exc:
                    raise CaptureError("%s: cannot read: %s" % (name, os_error_text(exc))) from None
            elif first == PCAPNG_SHB_MAGIC:
                reader = PcapngReader(name, fileobj, owns_file, linktypes, src, unpack)
                reader.start(first)
            elif len(first) < 4:
                raise CaptureError("%s: too short to be a capture (%d bytes: %s)"
                                   % (name, len(first), first.hex()))
            else:
                raise CaptureError("%s: %s" % (name, _not_a_capture(
                    first, unpack.compression if unpack is not None else "")))
        except CaptureError:
            # a header cut short by a damaged compressed stream: say so
            if unpack is not None and unpack.damage:
                raise CaptureError("%s: %s" % (name, unpack.damage)) from None
            raise
    except BaseException:
        if owns_file:
            try:
                fileobj.close()
            except OSError:
                pass
        raise
    return reader


def _sniff(name: str, src: Source) -> bytes:
    try:
        src.fill(4)
    except OSError as exc:
        raise CaptureError("%s: cannot read: %s" % (name, os_error_text(exc))) from None
    return src.buf[src.pos:src.pos + 4]


def _not_a_capture(first: bytes, compression: str = "") -> str:
    if compression:
        return "not a pcap or pcapng file (%s-compressed; decompressed, its first bytes are %s)" % (
            compression, first.hex())
    for magic, what in _WRAPPER_MAGICS.items():
        if first.startswith(magic):
            return "not a pcap or pcapng file (first bytes %s: looks %s; decompress it first)" % (
                first.hex(), what)
    return "not a pcap or pcapng file (first bytes %s)" % first.hex()


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
