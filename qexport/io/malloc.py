"""Tune glibc's allocator for the export process: keep freed tensor memory for reuse instead of returning it.

An export allocates and frees buffers of a few to a few hundred MB per tensor (the read, its fp16 copy, the
scaled codes). By default glibc hands each freed block above its mmap threshold back to the kernel, and worker
threads get arenas of their own, so every new tensor faults its pages in afresh: on the 1B benchmark about
800k page faults and 3.5 s of system time. One arena, a 32 MB mmap threshold (glibc's maximum) and no trimming
keep those pages mapped for the next tensor: about 230k faults and 1 s less wall time (bench/RESULTS.md). Peak
memory does not grow: it is still the largest working set of one tensor in flight per worker.

Applied by the command line only (a process that is about to stream a model), never on import of the library.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8


def keep_freed_memory() -> bool:
    """Apply the settings above; returns False where the C library is not glibc (nothing is changed there)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(option, value) == 1 for option, value in (
        (M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, 32 * 2**20), (M_TRIM_THRESHOLD, 2**31 - 1)))  # C int
