"""tcpdump filter expressions, compiled and run by libpcap itself.

``replay --filter EXPR`` takes the expression language of tcpdump(8) and
pcap-filter(7), so nothing but libpcap may interpret it: the expression is
compiled by ``pcap_compile`` (on a handle from ``pcap_open_dead`` for each
link type met: the same expression is a different program on Ethernet,
Linux cooked or raw IP) and each frame is run through ``pcap_offline_filter``,
the same BPF interpreter tcpdump uses on a saved file.  The library is
Debian's ``libpcap0.8`` (or any libpcap 1.x), reached through ``ctypes``:
no compiled extension, no new Python dependency.  When it is missing the
filter fails with one line naming the library to install.
"""

from __future__ import annotations

import ctypes
import ctypes.util

from .errors import ColoError

__all__ = ["BpfFilter", "FilterError"]

#: what pcap_compile is given as the netmask when it is not known (only
#: "ip broadcast" needs one)
_NETMASK_UNKNOWN = 0xFFFFFFFF
#: libpcap's MAXIMUM_SNAPLEN
_SNAPLEN = 262144

#: LINKTYPE values in files whose DLT value (what pcap_open_dead takes)
#: differs: raw IP is DLT_RAW, whatever number a writer stored.
_RAW_LINKTYPES = (101, 12, 14)

_LIBRARY_NAMES = ("libpcap.so.1", "libpcap.so.0.8", "libpcap.so", "libpcap.A.dylib",
                  "libpcap.dylib", "wpcap.dll")


class FilterError(ColoError):
    """A filter that cannot be used: a one-line message."""


class _BpfProgram(ctypes.Structure):
    _fields_ = [("bf_len", ctypes.c_uint), ("bf_insns", ctypes.c_void_p)]


class _PktHdr(ctypes.Structure):
    # struct pcap_pkthdr: struct timeval, caplen, len (the filter reads only
    # the lengths; timeval is two longs on the LP64 systems libpcap runs on)
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long),
                ("caplen", ctypes.c_uint32), ("len", ctypes.c_uint32)]


_lib = None


def _library():
    """libpcap, loaded once; FilterError when it cannot be found."""
    global _lib
    if _lib is not None:
        return _lib
    names = []
    found = ctypes.util.find_library("pcap")
    if found:
        names.append(found)
    names += [n for n in _LIBRARY_NAMES if n != found]
    lib = None
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        raise FilterError("--filter needs libpcap, which is not installed "
                          "(Debian/Ubuntu: apt-get install libpcap0.8; Fedora: dnf install libpcap)")
    lib.pcap_open_dead.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.pcap_open_dead.restype = ctypes.c_void_p
    lib.pcap_compile.argtypes = [ctypes.c_void_p, ctypes.POINTER(_BpfProgram), ctypes.c_char_p,
                                 ctypes.c_int, ctypes.c_uint32]
    lib.pcap_compile.restype = ctypes.c_int
    lib.pcap_geterr.argtypes = [ctypes.c_void_p]
    lib.pcap_geterr.restype = ctypes.c_char_p
    lib.pcap_offline_filter.argtypes = [ctypes.POINTER(_BpfProgram), ctypes.POINTER(_PktHdr),
                                        ctypes.c_char_p]
    lib.pcap_offline_filter.restype = ctypes.c_int
    lib.pcap_freecode.argtypes = [ctypes.POINTER(_BpfProgram)]
    lib.pcap_freecode.restype = None
    lib.pcap_close.argtypes = [ctypes.c_void_p]
    lib.pcap_close.restype = None
    lib.pcap_datalink_name_to_val.argtypes = [ctypes.c_char_p]
    lib.pcap_datalink_name_to_val.restype = ctypes.c_int
    _lib = lib
    return lib


class BpfFilter:
    """One filter expression; ``matches(linktype, frame, orig_len)`` tells
    whether a frame of that link type passes.  Programs are compiled per
    link type on first use (:meth:`compile` checks one up front)."""

    def __init__(self, expression: str) -> None:
        self.expression = expression
        self._lib = _library()
        self._programs: dict[int, _BpfProgram] = {}
        self._hdr = _PktHdr()
        self._hdr_ref = ctypes.byref(self._hdr)

    def compile(self, linktype: int) -> _BpfProgram:
        prog = self._programs.get(linktype)
        if prog is not None:
            return prog
        lib = self._lib
        dlt = linktype
        if linktype in _RAW_LINKTYPES:
            dlt = lib.pcap_datalink_name_to_val(b"RAW")
        handle = lib.pcap_open_dead(dlt, _SNAPLEN)
        if not handle:
            raise FilterError(f"--filter: libpcap cannot open a handle for link type {linktype}")
        prog = _BpfProgram()
        try:
            try:
                text = self.expression.encode("utf-8")
            except UnicodeEncodeError:
                raise FilterError(f"--filter {self.expression!r}: not UTF-8") from None
            if b"\0" in text:
                raise FilterError(f"--filter {self.expression!r}: contains a NUL character")
            if lib.pcap_compile(handle, ctypes.byref(prog), text, 1, _NETMASK_UNKNOWN) != 0:
                error = (lib.pcap_geterr(handle) or b"cannot compile").decode("utf-8", "replace")
                from .capture import describe_linktype
                raise FilterError(f"--filter {self.expression!r}: {error} "
                                  f"(for link type {describe_linktype(linktype)})")
        finally:
            lib.pcap_close(handle)
        self._programs[linktype] = prog
        return prog

    def matches(self, linktype: int, frame: bytes, orig_len: int) -> bool:
        prog = self._programs.get(linktype) or self.compile(linktype)
        hdr = self._hdr
        hdr.caplen = len(frame)
        hdr.len = max(orig_len, len(frame)) & 0xFFFFFFFF
        return self._lib.pcap_offline_filter(ctypes.byref(prog), self._hdr_ref, frame) != 0

    def close(self) -> None:
        for prog in self._programs.values():
            self._lib.pcap_freecode(ctypes.byref(prog))
        self._programs.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter exit, nothing to do
            pass
