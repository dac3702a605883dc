"""One llama.cpp context over a loaded model: a lane that scores one window at a time.

A runtime owns several lanes over one model (the weights are loaded and repacked once) and
runs them from Python threads: ctypes releases the GIL inside `llama_decode`, so lanes compute
in parallel. Each lane has its own KV cache, batch, output buffer and active adapter, so lanes
never share mutable state; the model and the adapters' tensors are read-only.
"""

from __future__ import annotations

import ctypes

import numpy as np

from edgefed.errors import RuntimeBackendError
from edgefed.runtime.backend import take_recent_errors

# 4 rows x 49k vocabulary floats = 0.8 MB: stays in a core's L2 cache (measured fastest of 4-32)
SCRATCH_ROWS = 4


class ScoringContext:
    """A llama context with its batch buffers and the adapter it has applied."""

    def __init__(self, ll, model, *, window: int, ubatch: int, threads: int, n_vocab: int):
        self._ll = ll
        self.threads = threads
        self.n_vocab = n_vocab
        params = ll.llama_context_default_params()
        params.n_ctx = window
        params.n_batch = window
        params.n_ubatch = ubatch
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
        self._batch = ll.llama_batch_init(window, 0, 1)
        for i in range(window):
            self._batch.n_seq_id[i] = 1
            self._batch.seq_id[i][0] = 0
        self._tokens = np.ctypeslib.as_array(self._batch.token, shape=(window,))
        self._pos = np.ctypeslib.as_array(self._batch.pos, shape=(window,))
        self._wants_logits = np.ctypeslib.as_array(
            ctypes.cast(self._batch.logits, ctypes.POINTER(ctypes.c_int8)), shape=(window,)
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
        ll = self._ll
        if handle is None:
            rc = ll.llama_set_adapters_lora(self._ctx, None, 0, None)
        else:
            handles = (ll.llama_adapter_lora_p_ctypes * 1)(handle)
            scales = (ctypes.c_float * 1)(1.0)
            rc = ll.llama_set_adapters_lora(self._ctx, handles, 1, scales)
        if rc != 0:
            raise RuntimeBackendError(
                f"llama.cpp refused to apply adapter {label}",
                take_recent_errors() or "reload the runtime",
            )
        self._active = handle

    def decode(self, tokens: np.ndarray, first_scored: int) -> np.ndarray:
        """Run one window; return its scored logits rows, a view into llama.cpp's buffer.

        The view is valid until the next `decode` on this context.
        """
        n = len(tokens)
        self._ll.llama_memory_clear(self._memory, True)
        self._tokens[:n] = tokens
        self._pos[:n] = np.arange(n, dtype=np.int32)
        self._wants_logits[:n] = 0
        self._wants_logits[first_scored : n - 1] = 1
        self._batch.n_tokens = n
        rc = self._ll.llama_decode(self._ctx, self._batch)
        if rc != 0:
            raise RuntimeBackendError(
                f"llama_decode failed with code {rc}",
                take_recent_errors() or "run with --verbose to see llama.cpp's log",
            )
        rows = n - 1 - first_scored
        pointer = self._ll.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(pointer, shape=(rows, self.n_vocab))

    def close(self) -> None:
        if self._closed:
            return
        self._ll.llama_batch_free(self._batch)
        self._ll.llama_free(self._ctx)
        self._closed = True
