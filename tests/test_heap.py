"""serve's C-heap settings (``colo_cli.heap``): with them, a stream of
large short-lived blocks, as serve's reads are, stops costing page faults.
Measured in subprocesses, so that this test process's heap is left alone."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROGRAM = r"""
import collections, resource, sys
from colo_cli.heap import keep_large_blocks
if sys.argv[1] == "keep":
    assert keep_large_blocks()
chunk = bytearray(256 * 1024)
view = memoryview(chunk)
held = collections.deque()
def read(n):
    # a read's copy, cut into records that wait a little (for their twin,
    # for outdev) while the copy itself is freed at once, as in serve
    data = view[:150_000 + (n * 7919) % 100_000].tobytes()
    held.extend(data[i:i + 1506] for i in range(0, len(data) - 1506, 1506))
    while len(held) > 300:
        held.popleft()
for n in range(200):                      # warm up
    read(n)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for n in range(2000):
    read(n)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True,
                         text=True, timeout=60, check=True)
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_blocks_stop_faulting_once_kept():
    from colo_cli.heap import keep_large_blocks
    if not keep_large_blocks():
        pytest.skip("this C library has no mallopt")
    kept, default = faults("keep"), faults("default")
    # 2000 blocks of 150-250 KiB: by default each is pages mapped and
    # faulted in anew; kept, they are the heap's own, faulted in once
    assert kept < 200, kept
    assert default > 10 * max(kept, 50), (default, kept)
