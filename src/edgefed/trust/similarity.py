"""Weight-similarity trust: cosine similarity of the adapters' low-rank products ΔW = B·A.

The paper's code compared A and B factor by factor, where A dominated and, drawn afresh on each
device, said little. Here each module's ΔW is compared, without ever forming an out × in
matrix: ⟨B1A1, B2A2⟩_F = Σ (B1ᵀB2) ∘ (A1A2ᵀ), a product of r × r matrices. The similarity of two
adapters is the cosine of their stacked ΔW over all modules.
"""

from __future__ import annotations

from collections.abc import Mapping

from edgefed.trust.merge import LORA_A, LORA_B, check_compatible, modules


def delta_inner(first: Mapping, second: Mapping) -> float:
    """Σ over modules of ⟨B1A1, B2A2⟩_F, through r × r Gram matrices."""
    total = 0.0
    for module in modules(first):
        b_gram = first[module + LORA_B].double().T @ second[module + LORA_B].double()
        a_gram = first[module + LORA_A].double() @ second[module + LORA_A].double().T
        total += float((b_gram * a_gram).sum())
    return total


def delta_cosine(first: Mapping, second: Mapping) -> float:
    """Cosine similarity of the two adapters' ΔW (0 when either is zero)."""
    check_compatible([first, second], [1.0, 1.0])
    norms = delta_inner(first, first) * delta_inner(second, second)
    return delta_inner(first, second) / norms**0.5 if norms > 0 else 0.0
