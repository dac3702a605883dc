"""The scoring rule shared by every perplexity in edgefed (llama.cpp and PyTorch alike).

A text of n tokens is cut into windows of at most `window` tokens that start every `stride`
tokens. Each token is predicted exactly once: in the first window every token after the first
is scored; in each later window only the tokens not scored before, so each of them sees at
least `window - stride` tokens of context. The last window ends at the text, never padded.
Both runtimes use this one function, so their perplexities are comparable token for token.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields

import numpy as np


@dataclass(frozen=True)
class Window:
    """Tokens [start, end) go through the model; predictions from `first_scored` on count.

    `first_scored` indexes within the window: the logits at window positions
    first_scored .. (end - start - 2) predict tokens start + first_scored + 1 .. end - 1.
    """

    start: int
    end: int
    first_scored: int

    @property
    def n_scored(self) -> int:
        return self.end - self.start - 1 - self.first_scored


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity of one text under one model (base, or base plus adapter)."""

    perplexity: float
    mean_nll: float
    tokens_scored: int
    tokens_evaluated: int
    seconds: float
    # each scored token's negative log-likelihood, in text order: trust compares two adapters
    # token by token (their paired standard error); None where only the summary was kept
    token_nlls: np.ndarray | None = field(default=None, repr=False, compare=False)

    def summary(self) -> dict:
        """The scalar fields, as a cache or a record keeps them."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "token_nlls"}

    @property
    def tokens_per_second(self) -> float:
        """Throughput over every token that went through the model, context included."""
        return self.tokens_evaluated / self.seconds if self.seconds > 0 else float("inf")

    @classmethod
    def from_logprobs(
        cls, logprobs: np.ndarray, n_tokens: int, window: int, stride: int, seconds: float
    ) -> PerplexityResult:
        """Summarise the scored tokens' log-probabilities of an `n_tokens` text."""
        mean_nll = float(-logprobs.mean())
        return cls(
            perplexity=float(np.exp(mean_nll)),
            mean_nll=mean_nll,
            tokens_scored=len(logprobs),
            tokens_evaluated=sum(w.end - w.start for w in windows(n_tokens, window, stride)),
            seconds=seconds,
            token_nlls=-logprobs.astype(np.float64),
        )


@dataclass(frozen=True)
class ScoreProgress:
    """Where a batch of scoring jobs stands; `finished` labels the job that just completed.

    `task` says what the batch is for ("trust row", "test split"), for the user.
    """

    task: str
    tokens_done: int
    tokens_total: int
    jobs_done: int
    jobs_total: int
    seconds: float
    finished: str | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_done / self.seconds if self.seconds > 0 else 0.0


def windows(n_tokens: int, window: int, stride: int) -> Iterator[Window]:
    """The windows that score tokens 1..n_tokens-1 once each (see the module docstring)."""
    if window < 2 or not 0 < stride < window:
        raise ValueError(f"need window >= 2 and 0 < stride < window, got {window}, {stride}")
    scored_until = 1  # token 0 has no context and is never scored
    start = 0
    while scored_until < n_tokens:
        end = min(start + window, n_tokens)
        yield Window(start, end, scored_until - start - 1)
        scored_until = end
        start = end - window + stride  # the next window scores `stride` new tokens
