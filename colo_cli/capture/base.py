"""What the capture formats share: the error, the reader's face and its
buffered source, and the checks of the writers.

A reader reads from a :class:`Source`, which fills a buffer from the file
in chunks and never seeks (pipes and stdin work).  Records come out of
``CaptureReader.__iter__`` as ``(frame_number, ts_ns, data, orig_len,
linktype)``; a damaged tail ends the iteration and leaves a warning
(``_stop``), only an I/O error raises.
"""

from __future__ import annotations

import operator
from typing import BinaryIO, Iterator

from ..errors import ColoError, os_error_text
from ..linklayer import describe_read
from .linktypes import describe_linktype

#: libpcap's MAXIMUM_SNAPLEN: no link type we read has a longer record, so a
#: longer captured length is a damaged (or hostile) header.
MAX_CAPLEN = 262144

#: Read size; big enough that per-read overhead vanishes, small enough that
#: memory does not depend on the capture's size.
CHUNK_BYTES = 1 << 20

NS_PER_S = 1_000_000_000


class CaptureError(ColoError):
    """Unreadable capture.

    ``str(e)`` is one line that starts with the capture's display name, e.g.
    ``primary.pcap: not a pcap or pcapng file (first bytes 7f454c46)``.
    """


def plural(n: int, word: str) -> str:
    return "%d %s%s" % (n, word, "" if n == 1 else "s")


class Source:
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


class CaptureReader:
    """A capture opened by ``open_capture`` (a ``PcapReader`` or a
    ``PcapngReader``); iterate it once for
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

    format = ""

    def __init__(self, name: str, fileobj: BinaryIO, owns_file: bool, linktypes,
                 src: Source, unpack=None) -> None:
        """``src`` reads ``fileobj`` (through ``unpack``, a decompressor,
        for a compressed file); its next bytes are the format's header,
        which ``start`` reads."""
        self.name = name
        self.linktype = None
        self.nanosecond = False
        self.snaplen = 0
        self.warnings = []
        self.packets = 0
        self._file = fileobj
        self._owns_file = owns_file
        self._linktypes = linktypes
        self._src = src
        self._unpack = unpack   # a compressed file's decompressor (compressed.Decompressor)
        self.compression = unpack.compression if unpack is not None else ""   # "gzip", "zstd"
        self._gen: Iterator | None = None
        self._closed = False
        self._finished = False

    def start(self, magic: bytes) -> None:
        """Read the file's header (the format's ``magic`` first); CaptureError
        when it is not one this reader reads."""
        raise NotImplementedError

    def _records(self) -> Iterator[tuple[int, int, bytes, int, int]]:
        raise NotImplementedError

    # -- public -----------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[int, int, bytes, int, int]]:
        if self._gen is None:
            if self._closed:
                return iter(())
            self._gen = self._records()
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

    # -- for the formats' readers ---------------------------------------------

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
                             % (self.name, what, plural(n, "packet")))

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self._unpack is not None and self._unpack.damage:
            # the decompressed data ended cleanly between records
            self._stop(self._unpack.damage)

    def _release(self) -> None:
        if self._owns_file:
            try:
                self._file.close()
            except OSError:
                pass

    def _read_error(self, exc: OSError) -> CaptureError:
        return self._fail("read error after %s: %s"
                          % (plural(self.packets, "packet"), os_error_text(exc)))

    def _check_linktype(self) -> None:
        if (self._linktypes is not None and self.linktype is not None
                and self.linktype not in self._linktypes):
            raise self._fail("link type %s is not one colo-compare reads (it reads %s)"
                             % (describe_linktype(self.linktype), describe_read()))


class TimestampError(CaptureError, ValueError):
    """A frame's time that the output format cannot store: before 1970, or
    past its end (2106 for pcap, 2554 for pcapng).  A capture can hold such
    times (pcapng's if_tsoffset) that its output cannot: a one-line error
    naming the output, not an internal error."""


def output_name(fileobj) -> str:
    name = getattr(fileobj, "name", None)
    return name if isinstance(name, str) else "output"


def check_ts_ns(ts_ns, name: str = "output") -> int:
    # operator.index refuses floats: a float cannot hold epoch nanoseconds.
    ts_ns = operator.index(ts_ns)
    if ts_ns < 0:
        raise TimestampError("%s: cannot write a frame dated before 1970 (%d ns)" % (name, ts_ns))
    return ts_ns
