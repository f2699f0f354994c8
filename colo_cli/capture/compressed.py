"""Compressed captures, decompressed as they are read (never whole).

gzip with the standard library; zstd (Wireshark's ``.pcapng.zst``) with
the ``zstandard`` package when it is installed.  A compressed stream that
is cut short or corrupt ends (EOF) and leaves a one-line ``damage``,
which the reader reports as a damaged tail: what was read is compared.
"""

from __future__ import annotations

import zlib
from typing import BinaryIO

from .base import CHUNK_BYTES, CaptureError, Source

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class Prefixed:
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


class Decompressor:
    """Decompresses as it is read, never the whole file at once.  A stream
    that is cut short or corrupt ends (EOF) and leaves a one-line
    ``damage``; read errors of the file itself still raise OSError."""

    def __init__(self, compression: str, raw: Prefixed) -> None:
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


def decompressing(name: str, compression: str, src: Source, fileobj: BinaryIO):
    """``(decompressor, source)``: the rest of the file (what ``src`` holds
    unread, then what ``fileobj`` has left) through a decompressor, and a
    Source reading what comes out."""
    if compression == "zstd":
        try:
            import zstandard  # noqa: F401
        except ImportError:
            raise CaptureError(f"{name}: zstd-compressed: reading it needs the Python package "
                               "'zstandard' (pip install zstandard), or decompress it first "
                               "(zstd -d)") from None
    unpack = Decompressor(compression, Prefixed(src.buf[src.pos:], fileobj))
    return unpack, Source(unpack)
