"""What a training process keeps of the memory it has freed.

A training step on the CPU allocates and frees thousands of activation tensors of a few MB.
glibc's malloc serves them from its heap once its dynamic mmap threshold has risen (it does at
the first large free), and the heap's high-water mark is then far above what the step holds
alive. A whole round on the embedded base with gradient checkpointing peaked at 2,481 MiB
where the live tensors stay under about 1.4 GiB (bench/memory.py, docs/measurements/memory.md). Two
remedies, both measured there:

* PyTorch's own switch THP_MEM_ALLOC_ENABLE: tensors of 2 MB and more are aligned to and
  advised as transparent huge pages. With checkpointing: 1,621 MiB instead of 2,481, at
  0.94x its training speed (1,516 MiB once training also frees the scoring lanes). Set here
  before torch allocates, unless the user has set it.
* malloc_trim(0) after every optimizer step (about 35 ms): the heap's free pages go back to
  the system, so the retention does not grow from step to step (in one 8-step training run
  with huge pages: a 1,331 MiB peak with it, 1,684 without).

A fixed mmap threshold (MALLOC_MMAP_THRESHOLD_=1048576) gave the lowest peak (1,397 MiB) but
trained at 0.64x the speed (every large tensor on fresh zeroed pages): measured, not adopted.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os


def use_huge_pages_for_tensors() -> None:
    """Before torch allocates its first tensor (it reads the switch once)."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "malloc_trim") else None  # glibc only
    except OSError:
        return None


def release_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim); a no-op where the
    C library has no such call (macOS, musl)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
