"""Keep freed memory for reuse instead of returning it to the kernel.

Each warp allocates a few hundred MB of arrays and frees them again. glibc hands large
blocks back to the kernel at once, and faulting them in again costs more than the fold
itself on virtual machines (measured: 1.4 GB of fresh pages take ~4 s here, reused pages
0.15 s). Raising malloc's mmap and trim thresholds keeps those pages in the process, so
peak RSS stays what it was and every warp after the first reuses warm memory.

Call it before the process starts any thread (the CLI does, first thing): a thread that
allocates before it gets a malloc arena of its own, and threads started later may be
given that arena, whose blocks above 64 MB are mmap'ed and faulted in afresh every time
(seen in the benchmark, whose sampler thread came first: the warp loader's clipped
weight took 0.27 instead of 0.19 CPU-s per warp).
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1
_done = False


def retain_freed_memory(max_block: int = 1 << 30) -> bool:
    """Ask glibc to serve blocks up to ``max_block`` bytes from its heap and never trim
    it. Returns False where this is not glibc (then nothing changes)."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, max_block) == 1
        # (mallopt takes a C int: ctypes masks larger values, and 1 << 62 became 0, which
        # trimmed the heap at every free; INT_MAX = 2 GB of free heap before a trim)
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1 if ok else False
        # One arena for all threads: a thread's own arena is capped at 64 MB heaps, so a
        # warp loaded in a background thread would be mmap'ed (and faulted in) afresh.
        ok &= libc.mallopt(_M_ARENA_MAX, 1) == 1 if ok else False
    except (OSError, AttributeError):
        return False
    _done = bool(ok)
    return _done
