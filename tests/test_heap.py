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


def _heap_range() -> tuple[int, int]:
    """The main arena's [heap] region of this process."""
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith("[heap]"):
                lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
                return lo, hi
    return 0, 0


def _in_heap(t: torch.Tensor) -> bool:
    """Whether ``t``'s memory lies in the main arena's [heap] region (else it is a mapping of its own)."""
    lo, hi = _heap_range()
    return lo <= t.data_ptr() < hi


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@glibc
def test_large_temporaries_are_reused_while_kept_and_handed_back_after():
    with heap.kept():
        for _ in range(3):  # a few steps' worth: the heap grows to what a step needs
            first = torch.ones(BIG, dtype=torch.uint8)
            assert _in_heap(first)  # not a mapping of its own
            del first
        end = _heap_range()[1]
        for _ in range(5):  # then the freed memory is reused: the heap neither shrinks nor grows
            again = torch.ones(BIG, dtype=torch.uint8)
            assert _in_heap(again) and _heap_range()[1] == end
            del again
        held = _resident_bytes()  # the freed pages stay with the process while kept
    assert _resident_bytes() < held - BIG // 2  # and go back to the system on leaving


@glibc
def test_nested_uses_undo_the_setting_when_the_last_leaves():
    with heap.kept():
        with heap.kept():
            pass
        assert heap._users == 1
        kept = torch.ones(BIG, dtype=torch.uint8)
        assert _in_heap(kept)  # the inner exit left the outer's setting
        del kept
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
