"""From raw trust scores to a row of W: sparsify (top-k, threshold), then a softmax: over
score / T, or over each score's distance from the device's own in standard errors, / T.

Scores are "higher is more trusted" (a scheme that measures a loss passes its negative). The
device itself is always kept, whatever top-k or the threshold would say: a device must never
be left with nothing but its peers.

With `errors` (each score's standard error relative to the device's own score), the softmax is
over how many standard errors each score lies above the device's own, (s_j − s_own) / σ_j, and
the temperature is in standard errors: a difference the measurement cannot resolve moves a
weight by about e^±1/T, never to one-hot, while a difference of many standard errors still can.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def trust_row(
    scores: Sequence[float],
    self_index: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    threshold: float | None = None,
    errors: Sequence[float | None] | None = None,
) -> list[float]:
    """Non-negative weights summing to 1, one per score (see the module docstring)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, not {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top-k must be at least 1, not {top_k}")
    if not 0 <= self_index < len(scores):
        raise ValueError("self_index is not one of the scores")
    if not math.isfinite(scores[self_index]):
        raise ValueError("this device's own trust score must be finite")
    # a peer whose score is not finite (an adapter so broken its loss overflows) gets weight 0
    kept = {j for j in range(len(scores)) if math.isfinite(scores[j])}
    if threshold is not None:
        kept = {j for j in kept if scores[j] >= threshold}
    if top_k is not None:
        ranked = sorted(kept - {self_index}, key=lambda j: (-scores[j], j))
        kept = set(ranked[: top_k - 1])
    kept.add(self_index)
    logits = {j: scores[j] / temperature for j in kept}
    if errors is not None:
        peers = kept - {self_index}
        if any(not (errors[j] is not None and errors[j] > 0) for j in peers):
            raise ValueError("every kept peer's standard error must be positive")
        own = scores[self_index]
        logits = {j: (scores[j] - own) / errors[j] / temperature for j in peers}
        logits[self_index] = 0.0
    best = max(logits.values())
    exps = {j: math.exp(logit - best) for j, logit in logits.items()}
    total = sum(exps.values())
    return [exps.get(j, 0.0) / total for j in range(len(scores))]
