"""How the C heap treats serve's large, short-lived buffers.

Each read of a busy frame input is one bytes object of up to 256 KiB
(``links.RECV_BYTES``), decoded into records and freed at once.  glibc
serves a block that large with its own ``mmap`` (above ``M_MMAP_THRESHOLD``,
128 KiB to start with, raised by itself as such blocks are freed) and
returns free memory at the top of the heap to the system once more than
``M_TRIM_THRESHOLD`` has gathered there: either way the next read's block is
new pages, zeroed by the kernel and faulted in one by one.  On the
benchmark VM (benchmarks/README.md) that was 15,000-47,000 page faults per
run and a fifth of serve's CPU; with the thresholds fixed higher the same
runs took ~430.

``keep_large_blocks`` fixes them: blocks up to 4 MiB come from the heap, and
up to 16 MiB of freed memory stays in the process for the next reads.
Setting them also turns glibc's own adjustment off.  The cost is that much
memory kept after a burst, within what ``serve(1)``'s Memory section
bounds.  On a C library without ``mallopt`` (musl, macOS) nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util

#: glibc's <malloc.h> parameter numbers
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 4 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 16 * 1024 * 1024


def keep_large_blocks() -> bool:
    """Set glibc's thresholds (see the module); True when both were set."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error
    return (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
            and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1)
