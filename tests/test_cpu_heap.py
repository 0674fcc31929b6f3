"""The pinned glibc heap policy that CPU steps and benchmarks run under."""

from __future__ import annotations

import ctypes.util
import sys

import pytest

from e2kd_fast.engine import cpu_heap

LINUX = sys.platform.startswith("linux")
GLIBC = LINUX and "libc.so.6" in (ctypes.util.find_library("c") or "")


@pytest.fixture
def unpinned(monkeypatch):
    """A process in which nothing has been pinned yet, whatever the tests before did."""
    monkeypatch.setattr(cpu_heap, "_pinned", None)
    for name in (*cpu_heap._USER_SETTINGS, "GLIBC_TUNABLES", "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_glibc_takes_both_thresholds_once(unpinned):
    line = cpu_heap.pin_cpu_heap()
    assert line == ("cpu heap: glibc mmap threshold 32 MiB, trim threshold 64 MiB (tensors below it reuse the heap)")
    unpinned.setenv("MALLOC_MMAP_THRESHOLD_", "1")  # a second call sets and reports nothing new
    assert cpu_heap.pin_cpu_heap() == line


@pytest.mark.skipif(not LINUX, reason="glibc's malloc settings")
@pytest.mark.parametrize("name", [*cpu_heap._USER_SETTINGS, "GLIBC_TUNABLES"])
def test_the_users_own_malloc_settings_are_left_alone(unpinned, name):
    unpinned.setenv(name, "glibc.malloc.mmap_threshold=65536" if name == "GLIBC_TUNABLES" else "65536")
    assert cpu_heap.pin_cpu_heap() == f"cpu heap: left as set by {name}"


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_tunables_for_other_parts_of_glibc_do_not_stop_the_pin(unpinned):
    unpinned.setenv("GLIBC_TUNABLES", "glibc.cpu.hwcaps=-AVX512F")
    assert cpu_heap.pin_cpu_heap().startswith("cpu heap: glibc mmap threshold 32 MiB")


@pytest.mark.skipif(not LINUX, reason="LD_PRELOAD")
def test_a_preloaded_allocator_is_left_alone(unpinned):
    unpinned.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert cpu_heap.pin_cpu_heap() == "cpu heap: left to the allocator in LD_PRELOAD"


@pytest.mark.skipif(not LINUX, reason="os.confstr on Linux")
def test_another_c_library_is_left_alone(unpinned):
    unpinned.setattr(cpu_heap.os, "confstr", lambda name: None)  # musl has no CS_GNU_LIBC_VERSION
    assert cpu_heap.pin_cpu_heap() == "cpu heap: left as it is (the C library is not glibc)"
