"""glibc's allocator set for tensors: freed memory is kept for the next allocation.

By default glibc hands blocks above ~128 KiB (a threshold that adapts up to 32 MiB) back to
the system when they are freed, and trims the top of the heap beyond twice that: the next
forward pass maps fresh pages and pays a page fault at the first touch of each. A forward pass
makes many large temporaries, so on a CPU this is a large share of its time (a 1,024-token
RWKV-7 prefill of the 0.1B shape: 1.9 M minor faults and 2.0 s by default, 0.35 M and 1.5 s
with freed memory kept; docs/benchmarks.md). The cost: memory freed by the process stays
resident for its next use (up to ``TRIM_BYTES`` above the heap's top), as tcmalloc and
jemalloc keep it.

Process-wide, so applied where rwkvpy owns the process or the model: the ``rwkvpy`` command,
:func:`rwkvpy.load` and the trainer. ``RWKVPY_MALLOC=default`` leaves glibc as it is; elsewhere
(no glibc) nothing happens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters
MMAP_BYTES = 32 << 20  # glibc's largest mmap threshold on 64-bit: only blocks beyond it are mapped
TRIM_BYTES = 1 << 30
TOP_PAD_BYTES = 64 << 20

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc to keep freed memory (once per process); whether it is so set."""
    global _applied
    if _applied is None:
        _applied = False
        if os.environ.get("RWKVPY_MALLOC", "").strip().lower() != "default":
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                mallopt = libc.mallopt
            except (OSError, AttributeError):  # no glibc (macOS, Windows, musl builds without it)
                return _applied
            _applied = all(mallopt(param, value) == 1 for param, value in
                           ((M_MMAP_THRESHOLD, MMAP_BYTES), (M_TRIM_THRESHOLD, TRIM_BYTES),
                            (M_TOP_PAD, TOP_PAD_BYTES)))
    return _applied
