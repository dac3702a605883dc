"""One quantized base loaded once, any number of LoRA adapters swapped over it.

Texts are tokenized by the base's own tokenizer (with BOS when the model asks for it) and
scored by the rule in `edgefed.scoring`; perplexity is exp(mean negative log-likelihood) over
all scored tokens.

Speed: a window is one `llama_decode` call whose batch asks logits only for the scored rows;
they are read in place from llama.cpp's buffer (no copy per token), and the log-softmax runs
over the whole block at once in numpy.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefed.errors import (
    AdapterMismatchError,
    DataError,
    ModelFormatError,
    RuntimeBackendError,
)
from edgefed.quant.gguf_file import open_gguf, read_base_info
from edgefed.runtime.backend import ensure_backend, take_recent_errors
from edgefed.scoring import PerplexityResult, windows

logger = logging.getLogger(__name__)

DEFAULT_WINDOW = 512


def default_threads() -> int:
    """All cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Adapter:
    """A GGUF LoRA adapter loaded into a runtime; valid while that runtime is open."""

    path: Path
    name: str


@dataclass(frozen=True)
class TopK:
    """The k most likely next tokens after each scored position, with their log-probabilities."""

    token_ids: np.ndarray  # (n_scored, k) int32, most likely first
    logprobs: np.ndarray  # (n_scored, k) float32


def _log_sum_exp_rows(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-sum-exp of a (rows, vocab) block, stable in float32."""
    row_max = logits.max(axis=1)
    return row_max + np.log(np.exp(logits - row_max[:, None]).sum(axis=1))


class LlamaRuntime:
    """The base model in llama.cpp, loaded once; adapters hot-swapped per evaluation.

    Not thread-safe: one runtime serves one caller at a time. Use as a context manager, or call
    `close()`, to free the model, its context and every adapter.
    """

    def __init__(
        self,
        base_path: str | os.PathLike[str],
        *,
        window: int = DEFAULT_WINDOW,
        threads: int | None = None,
        ubatch: int | None = None,
        remember_scores: bool = False,
    ) -> None:
        self._ll = ensure_backend()
        # perplexity and top-k results by (adapter, stride, tokens): a simulation scores the
        # same adapter on the same text once per variant; llama.cpp's answer is deterministic,
        # so the second time is a lookup
        self._scores: dict | None = {} if remember_scores else None
        ll = self._ll
        self.base_path = Path(base_path)
        self.info = read_base_info(self.base_path)
        if window < 2:
            raise DataError(f"window {window} is too small", "use a window of at least 2 tokens")
        self.window = min(window, self.info.context_length or window)
        self.threads = threads or default_threads()

        model_params = ll.llama_model_default_params()
        take_recent_errors()
        model = ll.llama_model_load_from_file(str(self.base_path).encode(), model_params)
        if not model:
            raise ModelFormatError(
                f"llama.cpp could not load {self.base_path} "
                f"({take_recent_errors() or 'no reason'})",
                "check that it is a complete GGUF base model",
            )
        self._model = model
        self._vocab = ll.llama_model_get_vocab(model)
        self.n_vocab = int(ll.llama_vocab_n_tokens(self._vocab))
        self.add_bos = bool(ll.llama_vocab_get_add_bos(self._vocab))
        self.bos = int(ll.llama_vocab_bos(self._vocab))
        self.eos = int(ll.llama_vocab_eos(self._vocab))

        ctx_params = ll.llama_context_default_params()
        ctx_params.n_ctx = self.window
        ctx_params.n_batch = self.window
        ctx_params.n_ubatch = min(ubatch or self.window, self.window)
        ctx_params.n_seq_max = 1
        ctx_params.n_threads = self.threads
        ctx_params.n_threads_batch = self.threads
        ctx_params.no_perf = True
        ctx = ll.llama_init_from_model(model, ctx_params)
        if not ctx:
            ll.llama_model_free(model)
            raise RuntimeBackendError(
                f"llama.cpp could not create a context ({take_recent_errors() or 'no reason'})",
                "try a smaller --window",
            )
        self._ctx = ctx
        self._memory = ll.llama_get_memory(ctx)
        self._batch = ll.llama_batch_init(self.window, 0, 1)
        for i in range(self.window):
            self._batch.n_seq_id[i] = 1
            self._batch.seq_id[i][0] = 0
        self._batch_tokens = np.ctypeslib.as_array(self._batch.token, shape=(self.window,))
        self._batch_pos = np.ctypeslib.as_array(self._batch.pos, shape=(self.window,))
        self._batch_logits = np.ctypeslib.as_array(
            ctypes.cast(self._batch.logits, ctypes.POINTER(ctypes.c_int8)), shape=(self.window,)
        )
        self._adapters: dict[Path, Adapter] = {}
        self._handles: dict[Path, object] = {}  # llama_adapter_lora pointers, owned by the model
        self._active: Adapter | None = None
        self._closed = False

    # -- life cycle -------------------------------------------------------------------------
    def __enter__(self) -> LlamaRuntime:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Free context, model and adapters. Safe to call twice.

        Adapters are not freed one by one: llama.cpp owns them through the model and frees
        them with it (freeing them first crashes this llama.cpp build).
        """
        if self._closed:
            return
        ll = self._ll
        ll.llama_batch_free(self._batch)
        ll.llama_free(self._ctx)
        self._adapters.clear()
        self._handles.clear()
        ll.llama_model_free(self._model)
        self._closed = True

    def __del__(self) -> None:  # a forgotten close() must not leak a few hundred MB
        with contextlib.suppress(Exception):
            self.close()

    # -- adapters ---------------------------------------------------------------------------
    def load_adapter(self, path: str | os.PathLike[str]) -> Adapter:
        """Load a GGUF LoRA adapter once; later calls with the same path return the same one.

        Raises InputFileError / ModelFormatError for a bad file and AdapterMismatchError when
        llama.cpp finds it was made for another base (shapes or architecture).
        """
        p = Path(path).resolve()
        if p in self._adapters:
            return self._adapters[p]
        import gguf

        reader = open_gguf(p, "adapter")
        general_type = reader.fields.get(gguf.Keys.General.TYPE)
        if general_type is None or general_type.contents() != "adapter":
            raise ModelFormatError(
                f"{p} is a GGUF model, not a LoRA adapter",
                "convert a PEFT adapter with `edgefed quant lora`",
            )
        take_recent_errors()
        handle = self._ll.llama_adapter_lora_init(self._model, str(p).encode())
        if not handle:
            reason = take_recent_errors() or "no reason given"
            raise AdapterMismatchError(
                f"adapter {p} does not fit base {self.base_path.name} ({reason})",
                "use an adapter trained on this base",
            )
        adapter = Adapter(path=p, name=p.stem)
        self._adapters[p] = adapter
        self._handles[p] = handle
        return adapter

    def _activate(self, adapter: Adapter | None, scale: float = 1.0) -> None:
        if adapter is self._active:
            return
        ll = self._ll
        if adapter is None:
            rc = ll.llama_set_adapters_lora(self._ctx, None, 0, None)
        else:
            handles = (ll.llama_adapter_lora_p_ctypes * 1)(self._handles[adapter.path])
            scales = (ctypes.c_float * 1)(scale)
            rc = ll.llama_set_adapters_lora(self._ctx, handles, 1, scales)
        if rc != 0:
            raise RuntimeBackendError(
                f"llama.cpp refused to apply adapter {adapter.name if adapter else 'none'}",
                take_recent_errors() or "reload the runtime",
            )
        self._active = adapter

    # -- tokens -----------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool | None = None, special: bool = False):
        """Token ids of `text` as the base's own tokenizer makes them (int32 array)."""
        data = text.encode("utf-8")
        with_bos = self.add_bos if add_bos is None else add_bos
        capacity = len(data) + 8
        buffer = (self._ll.llama_token * capacity)()
        # add_special=False: llama.cpp would add BOS by the model's flag only; we decide here
        n = self._ll.llama_tokenize(self._vocab, data, len(data), buffer, capacity, False, special)
        if n < 0:  # buffer too small: llama.cpp returns minus the size it needs
            capacity = -n
            buffer = (self._ll.llama_token * capacity)()
            n = self._ll.llama_tokenize(
                self._vocab, data, len(data), buffer, capacity, False, special
            )
        tokens = np.ctypeslib.as_array(buffer)[:n].astype(np.int32)
        return np.concatenate([[self.bos], tokens]).astype(np.int32) if with_bos else tokens

    # -- evaluation -------------------------------------------------------------------------
    def _decode_window(self, tokens: np.ndarray, first_scored: int) -> np.ndarray:
        """Run one window; return the logits rows (view into llama.cpp's buffer)."""
        n = len(tokens)
        self._ll.llama_memory_clear(self._memory, True)
        self._batch_tokens[:n] = tokens
        self._batch_pos[:n] = np.arange(n, dtype=np.int32)
        self._batch_logits[:n] = 0
        self._batch_logits[first_scored : n - 1] = 1
        self._batch.n_tokens = n
        rc = self._ll.llama_decode(self._ctx, self._batch)
        if rc != 0:
            raise RuntimeBackendError(
                f"llama_decode failed with code {rc}", take_recent_errors() or "see --debug log"
            )
        rows = n - 1 - first_scored
        pointer = self._ll.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(pointer, shape=(rows, self.n_vocab))

    def _as_tokens(self, text_or_tokens: str | Sequence[int] | np.ndarray) -> np.ndarray:
        tokens = (
            self.tokenize(text_or_tokens)
            if isinstance(text_or_tokens, str)
            else np.asarray(text_or_tokens, dtype=np.int32)
        )
        if len(tokens) < 2:
            raise DataError(
                f"the text has {len(tokens)} token(s); at least 2 are needed to score anything",
                "give a longer text",
            )
        if tokens.min() < 0 or tokens.max() >= self.n_vocab:
            raise DataError("token ids outside the base's vocabulary", "tokenize with this base")
        return tokens

    def _stride(self, stride: int | None) -> int:
        stride = stride or self.window // 2
        if not 0 < stride < self.window:
            raise DataError(
                f"stride {stride} must be in 1..{self.window - 1}", "pick another stride"
            )
        return stride

    def token_logprobs(
        self,
        text_or_tokens: str | Sequence[int] | np.ndarray,
        adapter: Adapter | None = None,
        *,
        stride: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(log p(token | context), token index) for every scored token, under `adapter`."""
        tokens = self._as_tokens(text_or_tokens)
        step = self._stride(stride)
        self._activate(adapter)
        logprobs: list[np.ndarray] = []
        positions: list[np.ndarray] = []
        for w in windows(len(tokens), self.window, step):
            start, end, first = w.start, w.end, w.first_scored
            window_tokens = tokens[start:end]
            logits = self._decode_window(window_tokens, first)
            lse = _log_sum_exp_rows(logits)
            targets = window_tokens[first + 1 :]
            picked = logits[np.arange(len(targets)), targets]
            logprobs.append((picked - lse).astype(np.float64))
            positions.append(np.arange(start + first + 1, end))
        return np.concatenate(logprobs), np.concatenate(positions)

    def perplexity(
        self,
        text_or_tokens: str | Sequence[int] | np.ndarray,
        adapter: Adapter | None = None,
        *,
        stride: int | None = None,
    ) -> PerplexityResult:
        """Perplexity of a text under `adapter` (None: the bare base), by the rule above."""
        tokens = self._as_tokens(text_or_tokens)
        step = self._stride(stride)
        key = self._score_key("perplexity", tokens, adapter, step)
        if key is not None and key in self._scores:
            return self._scores[key]
        started = time.perf_counter()
        logprobs, _ = self.token_logprobs(tokens, adapter, stride=step)
        seconds = time.perf_counter() - started
        result = PerplexityResult.from_logprobs(logprobs, len(tokens), self.window, step, seconds)
        self._remember(key, result)
        return result

    def _score_key(self, kind: str, tokens: np.ndarray, adapter, step: int, *extra) -> tuple | None:
        """The memo key of a deterministic score, or None when results are not remembered."""
        if self._scores is None:
            return None
        digest = hashlib.sha256(np.ascontiguousarray(tokens, dtype=np.int64).tobytes())
        return (kind, adapter.path if adapter else None, step, digest.hexdigest(), *extra)

    def _remember(self, key: tuple | None, result) -> None:
        if key is not None:
            self._scores[key] = result

    def top_k(
        self,
        text_or_tokens: str | Sequence[int] | np.ndarray,
        k: int,
        adapter: Adapter | None = None,
        *,
        stride: int | None = None,
    ) -> TopK:
        """The k most likely next tokens at every scored position (for prediction trust)."""
        if not 0 < k <= self.n_vocab:
            raise DataError(f"k={k} must be in 1..{self.n_vocab}", "pick a smaller k")
        tokens = self._as_tokens(text_or_tokens)
        step = self._stride(stride)
        key = self._score_key("top_k", tokens, adapter, step, k)
        if key is not None and key in self._scores:
            return self._scores[key]
        self._activate(adapter)
        ids: list[np.ndarray] = []
        values: list[np.ndarray] = []
        for w in windows(len(tokens), self.window, step):
            start, end, first = w.start, w.end, w.first_scored
            logits = self._decode_window(tokens[start:end], first)
            lse = _log_sum_exp_rows(logits)
            top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
            top_logits = np.take_along_axis(logits, top, axis=1)
            order = np.argsort(-top_logits, axis=1, kind="stable")
            top = np.take_along_axis(top, order, axis=1)
            ids.append(top.astype(np.int32))
            values.append(np.take_along_axis(top_logits, order, axis=1) - lse[:, None])
        result = TopK(token_ids=np.concatenate(ids), logprobs=np.concatenate(values))
        self._remember(key, result)
        return result
