"""The process's C heap (glibc's malloc) around large temporaries: handing free memory back (:func:`trim`), and
keeping it through a sampling run (:func:`kept`).

A transformer step allocates and frees tensors of tens of megabytes in every block. glibc gives an allocation above
its mmap threshold (which grows by itself to at most 32 MB) a fresh mapping and unmaps it when freed, so each such
tensor comes back from the kernel page by page, zeroed. Inside :func:`kept` the threshold and the trim threshold
are raised, so freed blocks are reused from the heap; on leaving, both are set to the largest values glibc's own
adjustment reaches and the free memory goes back to the system, so a run leaves no more memory behind than before.
Elsewhere than glibc both are no-ops.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
import threading

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEPT = 1 << 30  # while kept: allocations up to 1 GB come from the heap, and it is trimmed only above 1 GB free
# after: glibc's dynamic thresholds' ceiling on 64-bit (mmap threshold 32 MB, trim threshold twice that)
_AFTER_MMAP, _AFTER_TRIM = 32 << 20, 64 << 20

_lock = threading.Lock()
_users = 0


@functools.cache
def _libc():
    """The C library when it is glibc (mallopt and malloc_trim), else None (Windows, macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both or neither
    except (AttributeError, OSError, TypeError):
        return None
    return libc


def trim() -> None:
    """Hand the C heap's free memory back to the system (``malloc_trim``). Large temporaries freed by worker
    threads stay in their malloc arenas otherwise: packing int8 weights on two threads left the process 1.5 GB
    larger than on one."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(ctypes.c_size_t(0))


def _thresholds(mmap: int, trim_at: int) -> None:
    _libc().mallopt(ctypes.c_int(_M_MMAP_THRESHOLD), ctypes.c_int(mmap))
    _libc().mallopt(ctypes.c_int(_M_TRIM_THRESHOLD), ctypes.c_int(trim_at))


@contextlib.contextmanager
def kept():
    """Freed memory stays in the heap for reuse while inside (nested and concurrent uses share one setting, undone
    when the last one leaves); on leaving it goes back to the system."""
    global _users
    if _libc() is None:
        yield
        return
    with _lock:
        _users += 1
        if _users == 1:
            _thresholds(_KEPT, _KEPT)
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                _thresholds(_AFTER_MMAP, _AFTER_TRIM)
                trim()
