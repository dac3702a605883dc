"""What a training process keeps of the memory it has freed.

A training step on the CPU allocates and frees thousands of activation tensors of a few MB.
glibc's malloc serves them from its heap once its dynamic mmap threshold has risen (it does at
the first large free), and the heap's high-water mark is then far above what the step holds
alive: one step of the embedded base, with gradient checkpointing, peaked at 2.6 GB of
resident memory where the live tensors never passed 1.3 GB (bench/memory.py, README Memory).
Two measured remedies, both standard:

* PyTorch's own switch THP_MEM_ALLOC_ENABLE: tensors of 2 MB and more are aligned to and
  advised as transparent huge pages. Measured on the embedded base with checkpointing: peak
  1.7 GB instead of 2.6, and no slower (fewer page faults). Set here before torch allocates,
  unless the user has set it.
* malloc_trim(0) where a long phase ends (training, before the round scores its peers with
  llama.cpp): the heap's free pages go back to the system, so the next phase does not stack
  its memory on the last one's leftovers. Once per phase it costs milliseconds; after every
  step it cost a step's page faults and did not lower the first step's peak.

A fixed mmap threshold (MALLOC_MMAP_THRESHOLD_=1048576) gave the lowest peak (1.3 GB) but ran
at 0.57-0.67x the speed (every large tensor fresh zeroed pages): measured, not adopted.
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
