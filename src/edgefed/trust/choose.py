"""auto trust: a device scores a few candidate mixes on its own held-out tokens, keeps the best.

No fixed scheme or sharpness wins everywhere (docs/measurements/regime-map.md): sharp rows win with
much text and short training, the uniform mix once every device has overfitted, and the device's own
adapter where its text is its best teacher. A device can measure which holds for it. The candidates
are its own adapter (local), the uniform mix (FedAvg) and its perplexity trust row at the
sharpnesses in `CANDIDATE_SE_TEMPERATURES`; each is mixed exactly as the round would mix it and
scored by llama.cpp; the one with the lowest mean loss is the row.

Two disjoint token sets (`validation_halves`): the perplexity scores behind the trust rows come
from the trust half of the device's trust-validation split, the choice from the selection half.
A candidate's selection score therefore never includes tokens its own weights were fitted to:
choosing on the trust half would favour the sharpest row, which is sharp exactly where the trust
half's noise pointed. Every candidate's selection score is recorded (trust.json `candidates`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from edgefed.trust.noise import PERPLEXITY_NOISE_FLOOR, paired_standard_error
from edgefed.trust.normalize import trust_row

# the trust rows a device tries, in standard errors of each peer's paired score difference:
# 1 won with 60 documents and one epoch, 3 is the fixed default, 10 is near the uniform mix
# without being it (docs/measurements/regime-map.md)
CANDIDATE_SE_TEMPERATURES = (1.0, 3.0, 10.0)


@dataclass(frozen=True)
class Candidate:
    """One mix a device tries: its label, weights (in the row's device order) and, once
    scored, its mean loss on the selection tokens and the paired standard error of its
    difference from the chosen candidate."""

    label: str
    weights: list[float]
    selection_nll: float | None = None
    standard_error: float | None = None

    def as_dict(self) -> dict:
        return {
            "label": self.label,
            "weights": self.weights,
            "selection_nll": self.selection_nll,
            "selection_perplexity": None
            if self.selection_nll is None
            else math.exp(self.selection_nll),
            "standard_error": self.standard_error,
        }


def candidate_rows(scores: Sequence[float], errors: Sequence[float | None]) -> list[Candidate]:
    """local, fedavg and the perplexity rows at each candidate sharpness, for a device whose
    own score is first; rows that come out equal (a device with one peer far away) are tried
    once, under the first label that made them."""
    n = len(scores)
    rows = [
        Candidate("local", [1.0] + [0.0] * (n - 1)),
        Candidate("fedavg", [1.0 / n] * n),
    ]
    for z in CANDIDATE_SE_TEMPERATURES:
        weights = trust_row(list(scores), 0, temperature=z, errors=list(errors))
        rows.append(Candidate(f"perplexity:se={z:g}", weights))
    unique: list[Candidate] = []
    for row in rows:
        if not any(
            all(abs(a - b) < 1e-9 for a, b in zip(row.weights, seen.weights, strict=True))
            for seen in unique
        ):
            unique.append(row)
    return unique


def choose_mix(
    candidates: Sequence[Candidate],
    score: Callable[[Sequence[Candidate]], list],
) -> tuple[Candidate, list[Candidate]]:
    """Score every candidate (`score` returns one per-token NLL array each, on the selection
    tokens) and return the best with every candidate's record."""
    nlls = score(candidates)
    best = min(range(len(candidates)), key=lambda i: float(nlls[i].mean()))
    scored = [
        Candidate(
            c.label,
            c.weights,
            float(values.mean()),
            None
            if i == best
            else paired_standard_error(nlls[best], values, PERPLEXITY_NOISE_FLOOR),
        )
        for i, (c, values) in enumerate(zip(candidates, nlls, strict=True))
    ]
    return scored[best], scored
