"""One quantized base loaded once, any number of LoRA adapters swapped over it.

Texts are tokenized by the base's own tokenizer (with BOS when the model asks for it) and
scored by the rule in `edgefed.scoring`; perplexity is exp(mean negative log-likelihood) over
all scored tokens.

Speed: a window is one `llama_decode` call (several on a large vocabulary: see
LOGITS_BLOCK_BYTES) whose batch asks logits only for the scored rows; they are read in place
from llama.cpp's buffer (no copy per token), and the log-softmax runs over each block in
numpy. Work is a list of jobs (a text under an adapter); their windows are shared out over
`lanes` llama contexts on one loaded model, each run from its own Python thread with its share
of the threads (see `default_lanes` for why). A window's result does not depend on the lane
that computed it, so parallel scoring returns exactly what one lane would (tested).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefed.errors import AdapterMismatchError, DataError, ModelFormatError, RuntimeBackendError
from edgefed.plural import counted
from edgefed.quant.gguf_file import read_base_info
from edgefed.runtime.backend import ensure_backend, take_recent_errors
from edgefed.runtime.base_scores import BaseScoreCache
from edgefed.runtime.context import ScoringContext
from edgefed.runtime.generate import (
    Generation,
    GenerationContext,
    Sampling,
    chat_formatter,
    token_bytes,
)
from edgefed.scoring import PerplexityResult, ScoreProgress, windows

logger = logging.getLogger(__name__)

DEFAULT_WINDOW = 512
# Lanes (llama contexts scoring in parallel over one model) by default: one per thread, at most
# this many. Measured on 2 idle cores (bench/trust.py, bench/runtime.py): two one-thread lanes
# score a trust row of many adapters 5% faster than one two-thread context (one lane's numpy
# log-softmax overlaps the other's forward pass) and a single text as fast; on a busy machine
# fewer thread barriers per graph node gain more. Each lane holds its own KV cache, compute and
# logits buffers (68 MiB on the embedded base), so the default stops at 4 lanes to fit a
# laptop, and at fewer where the lanes' buffers would take more than LANES_MEMORY_SHARE of the
# machine's memory (`lane_bytes`); with more threads each lane gets several.
MAX_DEFAULT_LANES = 4
LANES_MEMORY_SHARE = 1 / 16
# Logits a lane holds at once. llama.cpp keeps a float32 row per vocabulary entry for every
# position of a decode call, twice (its output buffer and its graph's result): a 512-position
# window on Gemma's 262k vocabulary would be 512 MiB each. So a window is decoded
# LOGITS_BLOCK_BYTES // (4 x vocabulary) positions at a time (at least MIN_LOGITS_ROWS): the
# whole 512-token window at once on the embedded base's 49k vocabulary, 96 positions on
# Gemma's. The KV cache carries the context across calls, so the scores are those of one call
# with that micro-batch (tested).
LOGITS_BLOCK_BYTES = 96 << 20
MIN_LOGITS_ROWS = 16
# The context a generation gets unless it asks for another, capped at the base's own: a chat of
# a few dozen turns. Its KV cache is 94 MiB on the embedded base (30 layers x 3 KV heads x 64).
DEFAULT_GENERATION_CONTEXT = 4096


def default_threads() -> int:
    """All cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def logits_rows(window: int, n_vocab: int) -> int:
    """Positions a lane decodes per llama_decode call (see LOGITS_BLOCK_BYTES)."""
    return max(1, min(window, max(MIN_LOGITS_ROWS, LOGITS_BLOCK_BYTES // (4 * max(n_vocab, 1)))))


def lane_bytes(info, window: int, rows: int) -> int:
    """About what one lane allocates: its f16 KV cache, the logits twice (see
    LOGITS_BLOCK_BYTES) and the graph's activations; an estimate to size the default lanes by,
    not an accounting."""
    kv = info.n_layers * window * 2 * max(info.n_head_kv, 1) * info.head_dim * 2
    logits = 2 * rows * info.vocab_size * 4
    activations = rows * (window * max(info.n_head, 1) + 16 * info.n_embd) * 4
    return kv + logits + activations


def physical_memory() -> int:
    """This machine's memory in bytes (0 where the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 0


def default_lanes(threads: int, per_lane: int = 0, memory: int | None = None) -> int:
    """One lane per thread, at most MAX_DEFAULT_LANES, and no more than fit in
    LANES_MEMORY_SHARE of `memory` (default: this machine's) at `per_lane` bytes each; always
    at least one."""
    lanes = max(1, min(threads, MAX_DEFAULT_LANES))
    memory = physical_memory() if memory is None else memory
    if per_lane > 0 and memory > 0:
        lanes = min(lanes, max(1, int(memory * LANES_MEMORY_SHARE) // per_lane))
    return lanes


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


@dataclass(frozen=True)
class ScoreJob:
    """One text (or its tokens) under one adapter (None: the bare base); `label` names it in
    progress events."""

    tokens: str | Sequence[int] | np.ndarray
    adapter: Adapter | None = None
    label: str = ""


def _log_sum_exp_rows(logits: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """Row-wise log-sum-exp of a (rows, vocab) block, stable in float32.

    A few rows at a time through the lane's `scratch` buffer: one pass over a whole block
    allocated two window-sized temporaries (50 MB each for the embedded base's 256 scored rows,
    fresh zeroed pages every window) and ran 3x slower than chunks that stay in cache. Same
    values, bit for bit.
    """
    out = np.empty(len(logits), dtype=np.float32)
    step = len(scratch)
    for start in range(0, len(logits), step):
        rows = logits[start : start + step]
        buffer = scratch[: len(rows)]
        row_max = rows.max(axis=1)
        np.subtract(rows, row_max[:, None], out=buffer)
        np.exp(buffer, out=buffer)
        out[start : start + step] = row_max + np.log(buffer.sum(axis=1))
    return out


def _target_logprobs(logits: np.ndarray, targets: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    picked = logits[np.arange(len(targets)), targets]
    return (picked - _log_sum_exp_rows(logits, scratch)).astype(np.float64)


def _top_k_rows(k: int) -> Callable:
    def reduce(logits: np.ndarray, _targets: np.ndarray, scratch: np.ndarray):
        lse = _log_sum_exp_rows(logits, scratch)
        top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
        top_logits = np.take_along_axis(logits, top, axis=1)
        order = np.argsort(-top_logits, axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
        values = np.take_along_axis(top_logits, order, axis=1) - lse[:, None]
        return top.astype(np.int32), values

    return reduce


class LlamaRuntime:
    """The base model in llama.cpp, loaded once; adapters hot-swapped per evaluation.

    One caller at a time: the runtime parallelises its own work over its lanes, but two threads
    must not call it at once. Use as a context manager, or call `close()`, to free the model,
    its contexts and every adapter.
    """

    def __init__(
        self,
        base_path: str | os.PathLike[str],
        *,
        window: int = DEFAULT_WINDOW,
        threads: int | None = None,
        lanes: int | None = None,
        ubatch: int | None = None,
        rows: int | None = None,
        remember_scores: bool = False,
        cache_base_scores: bool = True,
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
        # positions per decode call, and llama.cpp's micro-batch within them
        self.rows = min(rows or logits_rows(self.window, self.info.vocab_size), self.window)
        self._ubatch = min(ubatch or self.window, self.rows)
        self.lanes = min(
            lanes or default_lanes(self.threads, lane_bytes(self.info, self.window, self.rows)),
            self.threads,
        )
        # the bare base's perplexity of a text never changes: remembered across processes
        # (`cache_base_scores=False` for benchmarks, which time the computation itself)
        self._base_scores = (
            BaseScoreCache(self.info, self.window, self._ubatch) if cache_base_scores else None
        )

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
        self._contexts: list[ScoringContext] = []
        self._generation: GenerationContext | None = None
        self._chat_template: Callable[[Sequence[dict[str, str]]], str] | None = None
        self._adapters: dict[Path, Adapter] = {}
        self._handles: dict[Path, object] = {}  # llama_adapter_lora pointers, owned by the model
        self._closed = False
        try:
            self._contexts_for(1)  # fail now, not at the first score, if no context fits
        except Exception:
            ll.llama_model_free(model)
            self._closed = True
            raise

    # -- life cycle -------------------------------------------------------------------------
    def __enter__(self) -> LlamaRuntime:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Free contexts, model and adapters. Safe to call twice.

        Adapters are not freed one by one: llama.cpp owns them through the model and frees
        them with it (freeing them first crashes this llama.cpp build).
        """
        if self._closed:
            return
        self.release_lanes()
        self._adapters.clear()
        self._handles.clear()
        self._ll.llama_model_free(self._model)
        self._closed = True

    def release_lanes(self) -> None:
        """Free every lane's KV cache and buffers (and the generation context's), keeping the
        model and its adapters: the next score makes its lanes again (milliseconds). Training
        calls it, so that the lanes do not sit in memory under its activations."""
        for context in self._contexts:
            context.close()
        self._contexts.clear()
        if self._generation is not None:
            self._generation.close()
            self._generation = None

    def __del__(self) -> None:  # a forgotten close() must not leak a few hundred MB
        with contextlib.suppress(Exception):
            self.close()

    def _contexts_for(self, tasks: int) -> list[ScoringContext]:
        """The lanes for `tasks` windows: made on first need, kept for the runtime's life.

        A lane that cannot be made (memory) leaves the runtime with the lanes it has.
        """
        wanted = max(1, min(self.lanes, tasks))
        while len(self._contexts) < wanted:
            index = len(self._contexts)
            take_recent_errors()
            try:
                context = ScoringContext(
                    self._ll,
                    self._model,
                    window=self.window,
                    rows=self.rows,
                    ubatch=self._ubatch,
                    threads=_share(self.threads, self.lanes, index),
                    n_vocab=self.n_vocab,
                )
            except RuntimeBackendError as exc:
                if not self._contexts:
                    raise
                logger.warning("scoring with %d lane(s): %s", index, exc)
                self.lanes = wanted = index  # out of memory for another lane: use fewer
                break
            self._contexts.append(context)
        return self._contexts[:wanted]

    # -- adapters ---------------------------------------------------------------------------
    def load_adapter(self, path: str | os.PathLike[str]) -> Adapter:
        """Load a GGUF LoRA adapter once; later calls with the same path return the same one.

        Raises InputFileError / ModelFormatError for a bad file and AdapterMismatchError when
        llama.cpp finds it was made for another base (shapes or architecture).
        """
        p = Path(path).resolve()
        if p in self._adapters:
            return self._adapters[p]
        from edgefed.quant.lora_gguf import open_lora_gguf

        open_lora_gguf(p)  # one line for a damaged file or a model, before llama.cpp reads it
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

    def _as_tokens(self, text_or_tokens: str | Sequence[int] | np.ndarray) -> np.ndarray:
        tokens = (
            self.tokenize(text_or_tokens)
            if isinstance(text_or_tokens, str)
            else np.asarray(text_or_tokens, dtype=np.int32)
        )
        if len(tokens) < 2:
            raise DataError(
                f"the text has {counted(len(tokens), 'token')}; at least 2 are needed to score "
                "anything",
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

    def _job(self, job: ScoreJob) -> ScoreJob:
        if job.adapter is not None and self._handles.get(job.adapter.path) is None:
            raise DataError(
                f"adapter {job.adapter.name} is not loaded in this runtime", "load it first"
            )
        return ScoreJob(self._as_tokens(job.tokens), job.adapter, job.label)

    # -- the scheduler ----------------------------------------------------------------------
    def _score_windows(
        self,
        jobs: Sequence[ScoreJob],
        step: int,
        reduce: Callable[[np.ndarray, np.ndarray, np.ndarray], object],
        *,
        task: str,
        on_progress: Callable[[ScoreProgress], None] | None,
    ) -> tuple[list[list], list[float]]:
        """Every job's windows through `reduce`, in window order; and each job's seconds.

        Windows are handed out in job order to the lanes, so lanes work on one adapter at a
        time and jobs finish one after another (progress reads naturally). The calling thread
        drives the first lane itself; an error or Ctrl-C in any lane stops the others after
        their window in flight.
        """
        plan = [
            (j, i, w)
            for j, job in enumerate(jobs)
            for i, w in enumerate(windows(len(job.tokens), self.window, step))
        ]
        per_job = [0] * len(jobs)
        for j, _, _ in plan:
            per_job[j] += 1
        results: list[list] = [[None] * n for n in per_job]
        remaining = list(per_job)
        first_start = [0.0] * len(jobs)
        last_end = [0.0] * len(jobs)
        total = sum(w.end - w.start for _, _, w in plan)
        state = {"next": 0, "done_tokens": 0, "done_jobs": 0, "stop": False}
        lock = threading.Lock()
        started = time.perf_counter()
        handles = [self._handles[job.adapter.path] if job.adapter else None for job in jobs]

        def work(context: ScoringContext) -> None:
            try:
                lane(context)
            except BaseException:
                with lock:
                    state["stop"] = True  # the other lanes stop after their window in flight
                raise

        def lane(context: ScoringContext) -> None:
            while True:
                with lock:
                    if state["stop"] or state["next"] >= len(plan):
                        return
                    j, i, w = plan[state["next"]]
                    state["next"] += 1
                    if not first_start[j]:
                        first_start[j] = time.perf_counter()
                job = jobs[j]
                context.activate(handles[j], job.label or "adapter")
                window_tokens = job.tokens[w.start : w.end]
                targets = window_tokens[w.first_scored + 1 :]
                results[j][i] = _joined(
                    [
                        reduce(logits, targets[first : first + len(logits)], context.scratch)
                        for first, logits in context.decode(window_tokens, w.first_scored)
                    ]
                )
                with lock:
                    state["done_tokens"] += w.end - w.start
                    remaining[j] -= 1
                    finished = None
                    if remaining[j] == 0:
                        last_end[j] = time.perf_counter()
                        state["done_jobs"] += 1
                        finished = job.label
                    if on_progress is not None:
                        on_progress(
                            ScoreProgress(
                                task=task,
                                tokens_done=state["done_tokens"],
                                tokens_total=total,
                                jobs_done=state["done_jobs"],
                                jobs_total=len(jobs),
                                seconds=time.perf_counter() - started,
                                finished=finished,
                            )
                        )

        contexts = self._contexts_for(len(plan))
        for index, context in enumerate(contexts):  # fewer windows than lanes: fewer, wider lanes
            context.set_threads(_share(self.threads, len(contexts), index))
        with ThreadPoolExecutor(max_workers=max(1, len(contexts) - 1)) as pool:
            helpers = [pool.submit(work, context) for context in contexts[1:]]
            try:
                work(contexts[0])
            finally:
                wait(helpers)  # each stops after its window in flight once `stop` is set
        for helper in helpers:
            helper.result()  # the calling lane succeeded: re-raise a helper lane's error
        seconds = [end - begin for begin, end in zip(first_start, last_end, strict=True)]
        return results, seconds

    # -- evaluation -------------------------------------------------------------------------
    def _scored(
        self,
        kind: tuple,
        jobs: Sequence[ScoreJob],
        step: int,
        reduce: Callable,
        finish: Callable,
        *,
        task: str,
        on_progress: Callable[[ScoreProgress], None] | None,
    ) -> list:
        """Each job's result: remembered ones looked up, the rest scored over the lanes.

        `kind` names the score in memo keys; `finish(window results, job, seconds)` makes a
        job's result from its windows' `reduce` outputs.
        """
        jobs = [self._job(job) for job in jobs]
        digests = [_digest(job.tokens) for job in jobs]
        results = [
            self._recall(kind, job, digest, step) for job, digest in zip(jobs, digests, strict=True)
        ]
        todo = [j for j, result in enumerate(results) if result is None]
        if todo:
            rows, seconds = self._score_windows(
                [jobs[j] for j in todo], step, reduce, task=task, on_progress=on_progress
            )
            for j, parts, secs in zip(todo, rows, seconds, strict=True):
                results[j] = finish(parts, jobs[j], secs)
                self._store(kind, jobs[j], digests[j], step, results[j])
        return results

    def perplexities(
        self,
        jobs: Sequence[ScoreJob],
        *,
        stride: int | None = None,
        task: str = "scoring",
        on_progress: Callable[[ScoreProgress], None] | None = None,
    ) -> list[PerplexityResult]:
        """Perplexity of each job's text under its adapter, scored in parallel over the lanes.

        Results equal those of scoring the jobs one by one. Remembered results (see
        `remember_scores`; the bare base's always, also across processes) are not recomputed.
        """
        step = self._stride(stride)

        def finish(parts: list, job: ScoreJob, seconds: float) -> PerplexityResult:
            logprobs = np.concatenate(parts)
            return PerplexityResult.from_logprobs(
                logprobs, len(job.tokens), self.window, step, seconds
            )

        return self._scored(
            ("perplexity",),
            jobs,
            step,
            _target_logprobs,
            finish,
            task=task,
            on_progress=on_progress,
        )

    def perplexity(
        self,
        text_or_tokens: str | Sequence[int] | np.ndarray,
        adapter: Adapter | None = None,
        *,
        stride: int | None = None,
    ) -> PerplexityResult:
        """Perplexity of a text under `adapter` (None: the bare base), by the rule above."""
        return self.perplexities([ScoreJob(text_or_tokens, adapter)], stride=stride)[0]

    def token_logprobs(
        self,
        text_or_tokens: str | Sequence[int] | np.ndarray,
        adapter: Adapter | None = None,
        *,
        stride: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(log p(token | context), token index) for every scored token, under `adapter`."""
        job = self._job(ScoreJob(text_or_tokens, adapter))
        step = self._stride(stride)
        (rows,), _ = self._score_windows(
            [job], step, _target_logprobs, task="scoring", on_progress=None
        )
        positions = [
            np.arange(w.start + w.first_scored + 1, w.end)
            for w in windows(len(job.tokens), self.window, step)
        ]
        return np.concatenate(rows), np.concatenate(positions)

    def top_ks(
        self,
        jobs: Sequence[ScoreJob],
        k: int,
        *,
        stride: int | None = None,
        task: str = "scoring",
        on_progress: Callable[[ScoreProgress], None] | None = None,
    ) -> list[TopK]:
        """The k most likely next tokens at every scored position of each job (prediction trust)."""
        if not 0 < k <= self.n_vocab:
            raise DataError(f"k={k} must be in 1..{self.n_vocab}", "pick a smaller k")

        def finish(parts: list, _job: ScoreJob, _seconds: float) -> TopK:
            return TopK(
                token_ids=np.concatenate([ids for ids, _ in parts]),
                logprobs=np.concatenate([values for _, values in parts]),
            )

        return self._scored(
            ("top_k", k),
            jobs,
            self._stride(stride),
            _top_k_rows(k),
            finish,
            task=task,
            on_progress=on_progress,
        )

    def top_k(
        self,
        text_or_tokens: str | Sequence[int] | np.ndarray,
        k: int,
        adapter: Adapter | None = None,
        *,
        stride: int | None = None,
    ) -> TopK:
        """The k most likely next tokens at every scored position (for prediction trust)."""
        return self.top_ks([ScoreJob(text_or_tokens, adapter)], k, stride=stride)[0]

    # -- generation -------------------------------------------------------------------------
    def generation_context(self, context: int | None = None) -> int:
        """The positions a generation gets: `context`, else DEFAULT_GENERATION_CONTEXT, at most
        the base's own context length."""
        wanted = context or DEFAULT_GENERATION_CONTEXT
        if wanted < 16:
            raise DataError(f"a context of {wanted} tokens", "give --context 16 or more")
        return min(wanted, self.info.context_length or wanted)

    def generate(
        self,
        prompt: str | Sequence[int],
        adapter: Adapter | None = None,
        sampling: Sampling | None = None,
        *,
        chat: bool = False,
        context: int | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        """Continue `prompt` with the base (and `adapter`), streaming text to `on_text`.

        `prompt`: text (tokenized with the base's BOS rule), token ids, or with `chat` the
        user's message, rendered by the base's chat template. Raises DataError when the prompt
        does not fit the context and ModelFormatError when `chat` finds no template."""
        if chat and not isinstance(prompt, str):
            raise DataError("a chat prompt is text", "pass the message as a string")
        if chat:
            tokens = self.chat_tokens([{"role": "user", "content": prompt}])
        else:
            tokens = self.tokenize(prompt) if isinstance(prompt, str) else prompt
        return self._generate(tokens, adapter, sampling, context, on_text)

    def chat_tokens(self, messages: Sequence[dict[str, str]]) -> np.ndarray:
        """`messages` rendered by the base's chat template, as token ids (special tokens
        parsed; a BOS the template writes itself is not added twice)."""
        if self._chat_template is None:  # compiled once: a chat renders every turn, often twice
            self._chat_template = chat_formatter(self._ll, self._model, self._vocab)
        text = self._chat_template(messages)
        bos_text = self.detokenize([self.bos], special=True) if self.bos >= 0 else ""
        writes_bos = bool(bos_text) and text.startswith(bos_text)
        return self.tokenize(text, add_bos=self.add_bos and not writes_bos, special=True)

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        """The text of `tokens` (special tokens rendered only with `special`)."""
        data = b"".join(token_bytes(self._ll, self._vocab, int(t), special=special) for t in tokens)
        return data.decode("utf-8", errors="replace")

    def _generate(
        self,
        tokens: Sequence[int] | np.ndarray,
        adapter: Adapter | None,
        sampling: Sampling | None,
        context: int | None,
        on_text: Callable[[str], None] | None,
    ) -> Generation:
        n_ctx = self.generation_context(context)
        if self._generation is None or self._generation.n_ctx != n_ctx:
            if self._generation is not None:
                self._generation.close()
            self._generation = None
            self._generation = GenerationContext(
                self._ll, self._model, self._vocab, n_ctx=n_ctx, threads=self.threads
            )
        handle = None
        if adapter is not None:
            handle = self._handles.get(adapter.path)
            if handle is None:
                raise DataError(
                    f"adapter {adapter.name} is not loaded in this runtime", "load it first"
                )
        label = adapter.name if adapter is not None else "base"
        ids = [int(t) for t in np.asarray(tokens).ravel()]
        if ids and (min(ids) < 0 or max(ids) >= self.n_vocab):
            raise DataError("token ids outside the base's vocabulary", "tokenize with this base")
        return self._generation.generate(ids, handle, label, sampling or Sampling(), on_text)

    # -- remembered scores ------------------------------------------------------------------
    def _recall(self, kind: tuple, job: ScoreJob, digest: str, step: int):
        """A remembered result: in memory (`remember_scores`), or a base perplexity on disk."""
        if self._scores is not None:
            key = (*kind, job.adapter.path if job.adapter else None, step, digest)
            if key in self._scores:
                return self._scores[key]
        if kind == ("perplexity",) and job.adapter is None and self._base_scores is not None:
            return self._base_scores.get(digest, step)
        return None

    def _store(self, kind: tuple, job: ScoreJob, digest: str, step: int, result) -> None:
        if self._scores is not None:
            self._scores[(*kind, job.adapter.path if job.adapter else None, step, digest)] = result
        if kind == ("perplexity",) and job.adapter is None and self._base_scores is not None:
            self._base_scores.put(digest, step, result)


def _joined(parts: list):
    """One window's `reduce` outputs over its decode calls, as if reduced at once (an array,
    or a tuple of arrays, row-wise)."""
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], tuple):
        return tuple(np.concatenate(column) for column in zip(*parts, strict=True))
    return np.concatenate(parts)


def _share(threads: int, lanes: int, index: int) -> int:
    """Lane `index`'s share of `threads` over `lanes` (one more while the remainder lasts)."""
    return max(1, threads // lanes + (index < threads % lanes))


def _digest(tokens: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype=np.int64).tobytes()).hexdigest()
