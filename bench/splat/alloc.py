"""glibc allocator tuning for CPU splatting.

The tiled engine allocates and frees many same-sized multi-megabyte blocks. By default glibc serves
blocks above ``M_MMAP_THRESHOLD`` with fresh ``mmap`` calls and returns freed memory to the kernel, so
every chunk pays page faults again. Telling glibc to keep freed memory (no mmap for large blocks, no
trimming) removes that cost at the price of a higher resident set. This is process-wide, so it is not
done at import: the CPU trainers (FiT3D, Splat-and-Distill) and the benchmark workers call
:func:`tune_allocator` once at start. Equivalent without code:
``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from <malloc.h>
_done = False


def tune_allocator() -> bool:
    """Apply ``mallopt(M_MMAP_MAX, 0)`` and a huge ``M_TRIM_THRESHOLD``; True if applied (glibc only)."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    _done = ok
    return ok
