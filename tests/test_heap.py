"""The C heap around sampling (twig_core.heap): inside ``kept`` large temporaries are served from the heap, not mapped
afresh; leaving hands the pages back; nested uses undo the setting once; off Linux both are no-ops."""

from __future__ import annotations

import ctypes

import pytest
import torch

from bench.common import current_rss_mib
from twig_core import heap

glibc = pytest.mark.skipif(heap._libc() is None or not hasattr(heap._libc(), "mallinfo2"),
                           reason="glibc's malloc on Linux only")

BIG = 48 << 20  # above glibc's largest dynamic mmap threshold (32 MB)
BIG_MIB = BIG / 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mapped_bytes() -> int:
    """Bytes glibc holds in chunks mapped on their own (``mallinfo2().hblkhd``): what a large temporary adds when it
    is not served from the heap."""
    f = heap._libc().mallinfo2
    f.restype = _MallInfo2
    return f().hblkhd


@glibc
def test_large_temporaries_are_reused_while_kept_and_handed_back_after():
    with heap.kept():
        mapped = _mapped_bytes()
        for _ in range(5):  # a few steps' worth of a temporary above glibc's own mmap threshold
            t = torch.ones(BIG, dtype=torch.uint8)
            assert _mapped_bytes() == mapped  # served from the heap, not mapped afresh
            del t
        held = current_rss_mib()  # the freed pages stay with the process while kept
    assert current_rss_mib() < held - BIG_MIB / 2  # and go back to the system on leaving


@glibc
def test_nested_uses_undo_the_setting_when_the_last_leaves():
    with heap.kept():
        with heap.kept():
            pass
        assert heap._users == 1
        mapped = _mapped_bytes()
        t = torch.ones(BIG, dtype=torch.uint8)
        assert _mapped_bytes() == mapped  # the inner exit left the outer's setting
        del t
        held = current_rss_mib()
    assert heap._users == 0
    assert current_rss_mib() < held - BIG_MIB / 2


def test_an_error_inside_still_restores():
    with pytest.raises(ValueError), heap.kept():
        raise ValueError("step failed")
    assert heap._users == 0


def test_elsewhere_than_linux_both_are_no_ops(monkeypatch):
    heap._libc.cache_clear()
    monkeypatch.setattr(heap.sys, "platform", "win32")
    try:
        assert heap._libc() is None
        with heap.kept():  # nothing to set, nothing raised
            heap.trim()
        assert heap._users == 0
    finally:
        heap._libc.cache_clear()
