"""Reading and writing capture files: classic pcap and pcapng.

One format a module, as dpkt lays out its protocols: ``pcap`` and
``pcapng`` (each its reader and its writer), ``compressed`` (gzip, zstd),
``linktypes`` (the link-type table), ``base`` (what the formats share) and
``formats`` (which format a file is; writing in the input's).

The reader is our own, struct-based, because dpkt's readers get real files
wrong (``docs/captures.md``): they skip Simple Packet Blocks,
apply the first interface's time resolution to every interface, stop at a
second section of the other byte order, need ``seek`` to tell pcap from
pcapng (so ``-`` fails for pcapng), raise ``NeedData`` on a cut record header
and silently yield a short last record when the data is cut.

Contract of :func:`open_capture` and the :class:`CaptureReader` it returns:

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

from ..linklayer import LINKTYPES_READ
from .base import MAX_CAPLEN, CaptureError, CaptureReader, TimestampError
from .formats import LikeInputWriter, open_capture
from .linktypes import LINKTYPE_ETHERNET, LINKTYPE_NAMES, describe_linktype
from .pcap import PcapReader, PcapWriter
from .pcapng import MAX_BLOCK_LEN, PcapngReader, PcapngWriter

__all__ = [
    "CaptureError",
    "CaptureReader",
    "LINKTYPE_ETHERNET",
    "LINKTYPES_READ",
    "LINKTYPE_NAMES",
    "MAX_BLOCK_LEN",
    "MAX_CAPLEN",
    "PcapReader",
    "PcapWriter",
    "PcapngReader",
    "LikeInputWriter",
    "PcapngWriter",
    "TimestampError",
    "describe_linktype",
    "open_capture",
]
