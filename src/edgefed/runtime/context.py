"""One llama.cpp context over a loaded model: a lane that scores one window at a time.

A runtime owns several lanes over one model (the weights are loaded and repacked once) and
runs them from Python threads: ctypes releases the GIL inside `llama_decode`, so lanes compute
in parallel. Each lane has its own KV cache, batch, output buffer and active adapter, so lanes
never share mutable state; the model and the adapters' tensors are read-only.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator

import numpy as np

from edgefed.errors import RuntimeBackendError
from edgefed.runtime.backend import take_recent_errors

# 4 rows x 49k vocabulary floats = 0.8 MB: stays in a core's L2 cache (measured fastest of 4-32)
SCRATCH_ROWS = 4


def apply_adapter(ll, ctx, handle: object | None, label: str) -> None:
    """Make `handle` (a llama_adapter_lora pointer, at scale 1) the context's only adapter;
    None: the bare base."""
    if handle is None:
        rc = ll.llama_set_adapters_lora(ctx, None, 0, None)
    else:
        handles = (ll.llama_adapter_lora_p_ctypes * 1)(handle)
        scales = (ctypes.c_float * 1)(1.0)
        rc = ll.llama_set_adapters_lora(ctx, handles, 1, scales)
    if rc != 0:
        raise RuntimeBackendError(
            f"llama.cpp refused to apply adapter {label}",
            take_recent_errors() or "reload the runtime",
        )


class ScoringContext:
    """A llama context with its batch buffers and the adapter it has applied."""

    def __init__(
        self, ll, model, *, window: int, rows: int, ubatch: int, threads: int, n_vocab: int
    ):
        self._ll = ll
        self.threads = threads
        self.n_vocab = n_vocab
        # positions decoded per llama_decode call: llama.cpp sizes its logits buffers by them
        self.rows = rows
        params = ll.llama_context_default_params()
        params.n_ctx = window
        params.n_batch = rows
        params.n_ubatch = ubatch  # at most `rows` (the runtime's choice)
        params.n_seq_max = 1
        params.n_threads = threads
        params.n_threads_batch = threads
        params.no_perf = True
        ctx = ll.llama_init_from_model(model, params)
        if not ctx:
            raise RuntimeBackendError(
                f"llama.cpp could not create a context ({take_recent_errors() or 'no reason'})",
                "try a smaller --window or fewer --threads",
            )
        self._ctx = ctx
        self._memory = ll.llama_get_memory(ctx)
        self._batch = ll.llama_batch_init(rows, 0, 1)
        for i in range(rows):
            self._batch.n_seq_id[i] = 1
            self._batch.seq_id[i][0] = 0
        self._tokens = np.ctypeslib.as_array(self._batch.token, shape=(rows,))
        self._pos = np.ctypeslib.as_array(self._batch.pos, shape=(rows,))
        self._wants_logits = np.ctypeslib.as_array(
            ctypes.cast(self._batch.logits, ctypes.POINTER(ctypes.c_int8)), shape=(rows,)
        )
        # rows of logits the log-softmax works through at a time (see `_log_sum_exp_rows`)
        self.scratch = np.empty((SCRATCH_ROWS, n_vocab), dtype=np.float32)
        self._active: object | None = None  # the llama_adapter_lora pointer applied, or None
        self._closed = False

    def set_threads(self, threads: int) -> None:
        """Threads this lane computes with from its next window on (cheap; no realloc)."""
        if threads != self.threads:
            self._ll.llama_set_n_threads(self._ctx, threads, threads)
            self.threads = threads

    def activate(self, handle: object | None, label: str) -> None:
        """Apply one adapter (None: the bare base); a no-op when it is already applied."""
        if handle is self._active:
            return
        apply_adapter(self._ll, self._ctx, handle, label)
        self._active = handle

    def decode(self, tokens: np.ndarray, first_scored: int) -> Iterator[tuple[int, np.ndarray]]:
        """Run one window, `rows` positions per llama_decode call (the KV cache carries the
        context from one call to the next); yield (first scored row, logits rows) per call, each
        a view into llama.cpp's buffer that is valid until the next one is asked for.

        Scored rows are those of positions first_scored .. len(tokens) - 2 (the last position
        has no next token); row 0 is position first_scored's.
        """
        n = len(tokens)
        self._ll.llama_memory_clear(self._memory, True)
        if first_scored >= n - 1:  # nothing to score: no call, no rows
            yield 0, np.empty((0, self.n_vocab), dtype=np.float32)
            return
        for start in range(0, n, self.rows):
            end = min(n, start + self.rows)
            count = end - start
            self._tokens[:count] = tokens[start:end]
            self._pos[:count] = np.arange(start, end, dtype=np.int32)
            wanted = np.arange(start, end)
            self._wants_logits[:count] = (wanted >= first_scored) & (wanted < n - 1)
            self._batch.n_tokens = count
            rc = self._ll.llama_decode(self._ctx, self._batch)
            if rc != 0:
                raise RuntimeBackendError(
                    f"llama_decode failed with code {rc}",
                    take_recent_errors() or "run with --verbose to see llama.cpp's log",
                )
            scored = int(self._wants_logits[:count].sum())
            if scored:
                pointer = self._ll.llama_get_logits(self._ctx)
                first = max(start, first_scored) - first_scored
                yield first, np.ctypeslib.as_array(pointer, shape=(scored, self.n_vocab))

    def close(self) -> None:
        if self._closed:
            return
        self._ll.llama_batch_free(self._batch)
        self._ll.llama_free(self._ctx)
        self._closed = True
