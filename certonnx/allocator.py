"""glibc allocator settings for bound computation on CPU.

A bound pass allocates and frees tensors of megabytes to gigabytes many times per second
(the A matrices of every layer, their clamped halves, products). glibc serves every block
above its mmap threshold (128 KiB at start, raised dynamically only up to 32 MiB) with a
fresh ``mmap`` and returns it with ``munmap`` on free, so each temporary is page-faulted in
and zero-filled again: on CPU this costs as much as the arithmetic (measured on certonnx's
CROWN passes: 1.3–1.9× of their time, docs/benchmarks.md). :func:`tune_allocator` makes glibc
keep freed memory for reuse instead: no mmap for large blocks and no trimming of the heap.
The price is that the process keeps its peak memory until it exits, which suits a command-line
run; the ``certonnx`` command calls it at start (``CERTONNX_MALLOC_TUNING=0`` turns it off).
A library caller opts in by calling it. Nothing happens where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4

# the values: no mmap at all; trim only above 2**31 - 1 bytes free (mallopt takes an int);
# 64 MiB of top padding
MMAP_MAX, TRIM_THRESHOLD, TOP_PAD = 0, 2**31 - 1, 64 << 20

_done: bool | None = None

# the same settings for a child process (glibc reads them at start): what the benchmarks give
# the auto_LiRPA worker, so that both engines run under one allocator policy
ENV = {"MALLOC_MMAP_MAX_": str(MMAP_MAX), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
       "MALLOC_TOP_PAD_": str(TOP_PAD)}


def tune_allocator() -> bool:
    """Keep freed heap memory for reuse (glibc): ``mallopt(M_MMAP_MAX, 0)``, a trim threshold
    of 2³¹ − 1 bytes and 64 MiB of top padding. Returns whether the settings were applied (False
    on other C libraries, or when ``CERTONNX_MALLOC_TUNING=0``). Idempotent."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("CERTONNX_MALLOC_TUNING", "1").strip() in ("0", "false", "no", "off"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - present only in glibc
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(M_MMAP_MAX, MMAP_MAX) == 1
    ok = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    ok = mallopt(M_TOP_PAD, TOP_PAD) == 1 and ok
    _done = ok
    return ok


def tuned() -> bool:
    """Whether :func:`tune_allocator` has applied its settings in this process."""
    return bool(_done)
