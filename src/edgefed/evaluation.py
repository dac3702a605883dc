"""Evaluate a base and any number of adapters on one text, with one loaded runtime."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from edgefed.errors import DataError
from edgefed.quant.gguf_file import require_file, resolve_base
from edgefed.scoring import ScoreProgress


@dataclass(frozen=True)
class EvaluationRow:
    """One model's result on the text: `model` is 'base' or the adapter's name."""

    model: str
    path: str
    perplexity: float
    mean_nll: float
    tokens_scored: int
    tokens_evaluated: int
    tokens_per_second: float
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate_text(
    text: str,
    *,
    base: str | os.PathLike[str] | None = None,
    adapters: Sequence[str | os.PathLike[str]] = (),
    window: int = 512,
    stride: int | None = None,
    threads: int | None = None,
    runtime_quant: str | None = None,
    on_progress: Callable[[ScoreProgress], None] | None = None,
) -> list[EvaluationRow]:
    """Perplexity of `text` under the base alone and under each adapter, in that order.

    The base is loaded once (as its cached `runtime_quant` copy, see `runtime_copy`);
    adapters are hot-swapped and scored in parallel over the runtime's lanes. Every adapter is
    checked before any evaluation starts, so a bad adapter fails in seconds, not after the
    others ran.
    """
    from edgefed.runtime import DEFAULT_RUNTIME_QUANT, LlamaRuntime, ScoreJob, runtime_copy

    if not text.strip():
        raise DataError("the text to evaluate is empty", "point --data at non-empty text")
    adapter_paths = [require_file(a, "adapter") for a in adapters]  # before any slow work
    base_path = runtime_copy(resolve_base(base), runtime_quant or DEFAULT_RUNTIME_QUANT)
    rows: list[EvaluationRow] = []
    with LlamaRuntime(base_path, window=window, threads=threads) as runtime:
        loaded = [runtime.load_adapter(p) for p in adapter_paths]
        tokens = runtime.tokenize(text)
        jobs = [ScoreJob(tokens, None, "base")] + [
            ScoreJob(tokens, adapter, label)
            for adapter, label in zip(loaded, _labels(adapter_paths), strict=True)
        ]
        paths = [base_path] + [a.path for a in loaded]
        results = runtime.perplexities(
            jobs, stride=stride, task="evaluating", on_progress=on_progress
        )
        for job, path, result in zip(jobs, paths, results, strict=True):
            rows.append(
                EvaluationRow(
                    model=job.label,
                    path=str(Path(path)),
                    perplexity=result.perplexity,
                    mean_nll=result.mean_nll,
                    tokens_scored=result.tokens_scored,
                    tokens_evaluated=result.tokens_evaluated,
                    tokens_per_second=result.tokens_per_second,
                    seconds=result.seconds,
                )
            )
    return rows


def _labels(paths: list[Path]) -> list[str]:
    """Each adapter's row label: its file name without .gguf, or the path as given where two
    share a name (`run-a/adapter.gguf` and `run-b/adapter.gguf` would read as one)."""
    stems = [p.stem for p in paths]
    return [str(p) if stems.count(stem) > 1 else stem for p, stem in zip(paths, stems, strict=True)]
