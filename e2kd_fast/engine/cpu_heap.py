"""A fixed glibc heap policy for steps on the CPU, where PyTorch takes tensor memory from ``malloc``.

glibc serves a block above its mmap threshold (128 KiB at first) with a fresh ``mmap``, whose pages
the kernel zeroes at first touch, and hands it back on ``free``. Its threshold slides up when such a
block is freed, so a step's activations (megabytes each) come from fresh pages or from the reused
heap depending on what the process allocated before: the same eager step ran up to a quarter slower
in one process than in another, the slow ones spending several times the system time
(bench/NOTES.md). Pinning the threshold at glibc's largest (32 MiB on 64-bit) and the trim threshold
above it keeps those tensors on the heap, so every step, and every benchmark variant, runs with the
same memory behind it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc refuses larger values on 64-bit (half its largest heap)
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # what glibc's sliding policy sets at that threshold
# The user's own malloc settings, which are left alone.
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")

_pinned: str | None = None


def pin_cpu_heap() -> str | None:
    """Pins glibc's mmap and trim thresholds for the rest of the process (glibc cannot go back).

    Unlike the CUDA math settings, this is not undone when training ends: glibc has no way back to
    its sliding threshold, and the setting changes only speed and resident memory, never results.
    Nothing changes where the C library is not glibc, where ``LD_PRELOAD`` names another allocator
    (jemalloc, tcmalloc, mimalloc), or where the environment already sets glibc's malloc parameters.
    Calling it again does nothing more.

    Returns:
        A log line saying what was set or why not, or None when there was nothing to say (not Linux).
    """
    global _pinned
    if _pinned is not None:
        return _pinned
    if not sys.platform.startswith("linux"):
        return None
    user = [name for name in _USER_SETTINGS if os.environ.get(name)]
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        user.append("GLIBC_TUNABLES")
    if user:
        _pinned = f"cpu heap: left as set by {', '.join(user)}"
    elif "alloc" in os.environ.get("LD_PRELOAD", ""):
        _pinned = "cpu heap: left to the allocator in LD_PRELOAD"
    else:
        _pinned = _mallopt()
    return _pinned


def _mallopt() -> str:
    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):
        glibc = None
    if not glibc:
        return "cpu heap: left as it is (the C library is not glibc)"
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return "cpu heap: left as it is (no mallopt in the C library)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        return "cpu heap: left as it is (glibc refused the mmap threshold)"
    trimmed = bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return (
        f"cpu heap: glibc mmap threshold {MMAP_THRESHOLD >> 20} MiB, "
        + (f"trim threshold {TRIM_THRESHOLD >> 20} MiB" if trimmed else "trim threshold refused")
        + " (tensors below it reuse the heap)"
    )
