"""The C heap around sampling (twig_core.heap): inside ``kept`` large temporaries come from the heap and are reused,
after it they are mapped and unmapped as glibc does by itself, and nested uses undo the setting once."""

from __future__ import annotations

import ctypes
import os

import pytest
import torch

from twig_core import heap

glibc = pytest.mark.skipif(heap._libc() is None or not hasattr(heap._libc(), "mallinfo2"),
                                reason="glibc's malloc on Linux only")

BIG = 48 << 20  # above glibc's largest dynamic mmap threshold (32 MB)


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


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@glibc
def test_large_temporaries_are_reused_while_kept_and_handed_back_after():
    with heap.kept():
        mapped = _mapped_bytes()
        for _ in range(5):  # a few steps' worth of a temporary above glibc's own mmap threshold
            t = torch.ones(BIG, dtype=torch.uint8)
            assert _mapped_bytes() == mapped  # served from the heap, not mapped afresh
            del t
        held = _resident_bytes()  # the freed pages stay with the process while kept
    assert _resident_bytes() < held - BIG // 2  # and go back to the system on leaving


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
        held = _resident_bytes()
    assert heap._users == 0
    assert _resident_bytes() < held - BIG // 2


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
