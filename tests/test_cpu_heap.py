"""The pinned glibc heap policy that CPU steps and benchmarks run under."""

from __future__ import annotations

import ctypes.util
import sys

import pytest

from e2kd_fast.engine import cpu_heap

GLIBC = sys.platform.startswith("linux") and "libc.so.6" in (ctypes.util.find_library("c") or "")


@pytest.fixture
def unpinned(monkeypatch):
    """A process in which nothing has been pinned yet, whatever the tests before did."""
    monkeypatch.setattr(cpu_heap, "_pinned", None)
    for name in (*cpu_heap._USER_SETTINGS, "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_glibc_takes_both_thresholds_once(unpinned):
    line = cpu_heap.pin_cpu_heap()
    assert line == ("cpu heap: glibc mmap threshold 32 MiB, trim threshold 64 MiB (tensors below it reuse the heap)")
    unpinned.setenv("MALLOC_MMAP_THRESHOLD_", "1")  # a second call sets and reports nothing new
    assert cpu_heap.pin_cpu_heap() == line


@pytest.mark.parametrize("name", cpu_heap._USER_SETTINGS)
def test_the_users_own_malloc_settings_are_left_alone(unpinned, name):
    unpinned.setenv(name, "glibc.malloc.mmap_threshold=65536" if name == "GLIBC_TUNABLES" else "65536")
    if sys.platform.startswith("linux"):
        assert cpu_heap.pin_cpu_heap() == f"cpu heap: left as set by {name}"
    else:
        assert cpu_heap.pin_cpu_heap() is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD")
def test_a_preloaded_allocator_is_left_alone(unpinned):
    unpinned.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert cpu_heap.pin_cpu_heap() == "cpu heap: left to the allocator in LD_PRELOAD"
