"""From raw trust scores to a row of W: sparsify (top-k, threshold), then softmax(score / T).

Scores are "higher is more trusted" (a scheme that measures a loss passes its negative). The
device itself is always kept, whatever top-k or the threshold would say: a device must never
be left with nothing but its peers.
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
    best = max(scores[j] for j in kept)
    exps = {j: math.exp((scores[j] - best) / temperature) for j in kept}
    total = sum(exps.values())
    return [exps.get(j, 0.0) / total for j in range(len(scores))]
