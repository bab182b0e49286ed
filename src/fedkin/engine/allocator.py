"""Let glibc recycle freed tensor memory instead of returning it to the kernel.

A vectorized round allocates and frees cohort-sized tensors (tens of MB: activations,
per-client gradients, parameters) at every local step. glibc ``malloc`` serves blocks above
``M_MMAP_THRESHOLD`` (128 KiB, adapting up to 32 MiB) with fresh ``mmap`` pages and unmaps them
on ``free``, so every step pays page faults and kernel page zeroing: on the throughput workload
of ``fedkin bench throughput`` rounds took 1.2–1.5x longer without this. Raising
``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` to ``limit`` bytes makes malloc keep up to
``limit`` bytes of freed memory for reuse. It is the effect the PyTorch CPU tuning guide gets
by preloading jemalloc/tcmalloc, through glibc's own ``mallopt`` and without ``LD_PRELOAD``.

The cost: resident memory stays near its peak instead of shrinking between rounds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

_M_TRIM_THRESHOLD = -1  # from glibc <malloc.h>
_M_MMAP_THRESHOLD = -3


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") else None


def retain_freed_memory(limit_mb: int) -> bool:
    """Keep up to ``limit_mb`` MiB of freed memory in this process (blocks up to that size are
    recycled by malloc rather than unmapped). Returns whether the setting took effect: False
    off glibc (macOS, musl, Windows), where the system allocator is left alone."""
    libc = _glibc()
    if libc is None or limit_mb <= 0:
        return False
    limit = limit_mb * 1024 * 1024
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, limit)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, limit)
    )
