"""The C heap around sampling (twig_core.heap): inside ``kept`` large temporaries come from the heap and are reused,
after it they are mapped and unmapped as glibc does by itself, and nested uses undo the setting once."""

from __future__ import annotations

import os

import pytest
import torch

from twig_core import heap

glibc = pytest.mark.skipif(heap._libc() is None or not os.path.exists("/proc/self/maps"),
                                reason="glibc's malloc on Linux only")

BIG = 48 << 20  # above glibc's largest dynamic mmap threshold (32 MB)


def _in_heap(t: torch.Tensor) -> bool:
    """Whether ``t``'s memory lies in the main arena's [heap] region (else it is a mapping of its own)."""
    address = t.data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith("[heap]"):
                lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
                if lo <= address < hi:
                    return True
    return False


@glibc
def test_large_temporaries_come_from_the_heap_only_while_kept():
    assert not _in_heap(torch.empty(BIG, dtype=torch.uint8))
    with heap.kept():
        first = torch.empty(BIG, dtype=torch.uint8)
        assert _in_heap(first)
        address = first.data_ptr()
        del first
        assert torch.empty(BIG, dtype=torch.uint8).data_ptr() == address  # reused, not handed back and refaulted
    assert not _in_heap(torch.empty(BIG, dtype=torch.uint8))


@glibc
def test_nested_uses_undo_the_setting_when_the_last_leaves():
    with heap.kept():
        with heap.kept():
            pass
        assert _in_heap(torch.empty(BIG, dtype=torch.uint8))  # the inner exit left the outer's setting
    assert not _in_heap(torch.empty(BIG, dtype=torch.uint8))
    assert heap._users == 0


@glibc
def test_an_error_inside_still_restores():
    with pytest.raises(ValueError), heap.kept():
        raise ValueError("step failed")
    assert heap._users == 0
    assert not _in_heap(torch.empty(BIG, dtype=torch.uint8))


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
