"""Keep freed host memory in the process, so large CPU tensors stop faulting in fresh pages.

glibc's ``malloc`` serves every request above 32 MiB (its largest ``mmap`` threshold) with a
new ``mmap`` and returns it with ``munmap`` when it is freed. A CPU training step allocates
and frees such tensors every step: the gradient of a 3072 x 3072 weight is 36 MiB, made anew
by each backward. The kernel then faults in and zeroes every 4 KiB page of it, every step: on
the 9.7M-parameter model of the end-to-end benchmark, about 9,200 page faults a rank and step,
and 9-17 ms of system time (``benchmarks/bench_sync_overhead.py --host-memory both``).

:func:`reuse_freed_memory` tells glibc to serve large requests from its heap and to keep up
to ``keep_bytes`` of freed memory there, so the next step's tensor reuses the pages of the
last one. This is what a caching allocator (PyTorch's on CUDA, jemalloc or tcmalloc on CPU)
does; the cost is that memory a process has freed stays counted in its resident size.

The reference trainer calls it in every worker (``TrainConfig.reuse_host_memory``, on by
default). In a script of your own, call it once at the start of each process, or set the
same through the environment before Python starts::

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_ARENA_MAX=1 torchrun ... train.py
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

# Settings a user makes through the environment; when any is present, theirs stand.
_USER_SETTINGS = (
    "MALLOC_ARENA_MAX",
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
)

_applied = False
_keep = 0  # the keep_bytes in effect


def reuse_freed_memory(keep_bytes: int = 1 << 30) -> bool:
    """Make glibc keep freed memory for reuse instead of unmapping it; return whether it did.

    Sets ``M_MMAP_MAX`` to 0 (large requests come from the heap, not from fresh mappings),
    ``M_TRIM_THRESHOLD`` to ``keep_bytes`` (free memory at the top of the heap is kept up to
    that much) and ``M_ARENA_MAX`` to 1: threads started from now on allocate from the main
    heap too, since the heaps glibc gives other threads end at 64 MiB and map anything larger
    afresh (``torch.topk`` over a 9.7M-entry gradient on the DDP hook's thread did). Threads
    then share one lock for ``malloc``, which PyTorch's CPU operators take once an operator,
    not once an element. Affects this process only, from now on; calling it again does nothing.

    Nothing is changed, and False returned, where it cannot help or the user has chosen: not
    Linux with glibc; another allocator preloaded (``LD_PRELOAD`` naming one, such as jemalloc
    or tcmalloc); or glibc's malloc already tuned through the environment (``MALLOC_ARENA_MAX``,
    ``MALLOC_MMAP_MAX_``, ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
    ``MALLOC_TOP_PAD_`` or a ``glibc.malloc`` entry of ``GLIBC_TUNABLES``).

    Args:
        keep_bytes: freed bytes the heap may keep, 1 MiB to 2 GiB - 1.

    Returns:
        True when the settings are in effect (set now or by an earlier call), else False.

    Raises:
        TypeError: ``keep_bytes`` is not an int.
        ValueError: ``keep_bytes`` out of range.

    Example:
        >>> import sparsetrain.hostmem
        >>> sparsetrain.hostmem.reuse_freed_memory()  # doctest: +SKIP
        True
    """
    global _applied, _keep
    if isinstance(keep_bytes, bool) or not isinstance(keep_bytes, int):
        raise TypeError(f"keep_bytes must be an int, got {keep_bytes!r}")
    if not (1 << 20) <= keep_bytes < (1 << 31):
        raise ValueError(
            f"keep_bytes must be from 1 MiB to 2 GiB - 1 (mallopt takes a C int), got {keep_bytes}"
        )
    if _applied:
        return True
    if not _glibc() or _user_allocator():
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6", use_errno=True).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    settings = ((_M_TRIM_THRESHOLD, keep_bytes), (_M_MMAP_MAX, 0), (_M_ARENA_MAX, 1))
    if not all(mallopt(param, value) == 1 for param, value in settings):
        return False
    _applied, _keep = True, keep_bytes
    return True


def reserve(nbytes: int) -> int:
    """Grow the heap by up to ``nbytes`` of memory touched now, and leave it free for reuse;
    return the bytes reserved (0 where :func:`reuse_freed_memory` is not in effect, since
    glibc would give them back at once).

    A CPU training run's first steps make their largest tensors (the gradients, the optimizer's
    momentum) for the first time, and the heap then grows a gradient at a time, now and then,
    as freed blocks are split by smaller ones: each growth faults in pages the kernel must
    zero, and on a virtual machine the first touch of a page can cost 50 microseconds (one
    36 MiB gradient: 0.4 s; the end-to-end benchmark's model faulted in 20,000 pages in its
    first step and a gradient's 9,216 now and then in the next ten). Reserving memory before
    training, as DDP takes its buckets when it is built, moves that cost out of the steps.
    The reserve stays counted in the process's resident size. At most the ``keep_bytes`` of
    :func:`reuse_freed_memory` less 1 MiB is reserved.
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, int):
        raise TypeError(f"nbytes must be an int, got {nbytes!r}")
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    nbytes = min(nbytes, _keep - (1 << 20))
    if not _applied or nbytes <= 0:
        return 0
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.restype, libc.free.argtypes = None, (ctypes.c_void_p,)
    block = libc.malloc(nbytes)
    if not block:
        return 0
    ctypes.memset(block, 0, nbytes)  # faults every page in
    libc.free(block)  # into the top of the heap, which keep_bytes lets it keep
    return nbytes


def reusing_freed_memory() -> bool:
    """Return whether :func:`reuse_freed_memory` has taken effect in this process."""
    return _applied


def _glibc() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):  # not a glibc system (musl has no such name)
        return False


def _user_allocator() -> bool:
    """Whether the user picked another allocator or tuned glibc's through the environment."""
    if any(name in os.environ for name in _USER_SETTINGS):
        return True
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return True
    return "malloc" in os.environ.get("LD_PRELOAD", "")
