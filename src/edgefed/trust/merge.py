"""Mixing adapters: θ_i ← Σ_j w_ij θ_j, factor-wise (the paper) or exactly (ΔW, then SVD).

Adapters are dicts of PEFT tensor names to tensors; every module has `<m>.lora_A.weight`
(r × in) and `<m>.lora_B.weight` (out × r). All functions are pure and check that the adapters
agree on names and shapes, and refuse a zero total weight instead of dividing by it.

The factor-wise mix averages A and B separately, so its ΔW is (Σ w B)(Σ w A), not Σ w B·A. The
exact mix forms Σ w_j B_j A_j without ever building an out × in matrix: stacking gives
ΔW = [w_1 B_1 … w_n B_n] · [A_1; …; A_n]; QR of both sides leaves an (n·r) × (n·r) core whose
SVD, truncated to rank r, gives the best rank-r adapter (Eckart–Young). The relative error
‖ΔW − B'A'‖_F / ‖ΔW‖_F follows from the discarded singular values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from edgefed.errors import AdapterMismatchError

LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"


@dataclass(frozen=True)
class MergeResult:
    """The merged adapter and, per module and overall, the relative error of its ΔW."""

    tensors: dict
    relative_error: float  # over all modules: sqrt(Σ discarded σ²) / sqrt(Σ σ²)
    module_errors: dict[str, float]


def modules(adapter: Mapping) -> list[str]:
    """The module names of an adapter, each with exactly one A and one B."""
    names = sorted(n.removesuffix(LORA_A) for n in adapter if n.endswith(LORA_A))
    if sorted(adapter) != sorted([n + LORA_A for n in names] + [n + LORA_B for n in names]):
        raise AdapterMismatchError(
            "an adapter has tensors that are not LoRA A/B pairs",
            "mix only LoRA adapters written by edgefed or PEFT",
        )
    return names


def check_compatible(adapters: Sequence[Mapping], weights: Sequence[float]) -> list[float]:
    """Same names and shapes everywhere, one non-negative weight each, normalised to sum 1."""
    if not adapters or len(adapters) != len(weights):
        raise ValueError(f"{len(adapters)} adapters but {len(weights)} weights")
    shapes = {n: tuple(t.shape) for n, t in adapters[0].items()}
    for index, adapter in enumerate(adapters[1:], start=1):
        if {n: tuple(t.shape) for n, t in adapter.items()} != shapes:
            raise AdapterMismatchError(
                f"adapter {index} differs from adapter 0 in tensor names or shapes",
                "mix only adapters of one federation",
            )
    if any(w < 0 for w in weights):
        raise ValueError("trust weights must be non-negative")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("the trust weights sum to zero: there is nothing to mix")
    return [float(w) / total for w in weights]


def merge_factors(
    adapters: Sequence[Mapping],
    weights: Sequence[float],
    b_weights: Sequence[float] | None = None,
) -> MergeResult:
    """Σ w A and Σ w B separately (the paper's mix); the error is against the exact Σ w B·A.

    `b_weights` mixes the B factors by other weights (FedSA-LoRA: A averaged, B the device's
    own); the error is then against Σ w B·A by `weights`."""
    import torch

    normalised = check_compatible(adapters, weights)
    b_normalised = normalised if b_weights is None else check_compatible(adapters, b_weights)
    merged = {
        name: sum(
            w * a[name].float()
            for w, a in zip(b_normalised if name.endswith(LORA_B) else normalised, adapters,
                            strict=True)
        )
        for name in adapters[0]
    }  # fmt: skip
    errors, discarded, total = {}, 0.0, 0.0
    for module in modules(adapters[0]):
        exact = sum(
            w * (a[module + LORA_B].double() @ a[module + LORA_A].double())
            for w, a in zip(normalised, adapters, strict=True)
        )
        mixed = merged[module + LORA_B].double() @ merged[module + LORA_A].double()
        difference = float(torch.linalg.norm(exact - mixed)) ** 2
        norm = float(torch.linalg.norm(exact)) ** 2
        errors[module] = (difference / norm) ** 0.5 if norm > 0 else 0.0
        discarded, total = discarded + difference, total + norm
    return MergeResult(merged, (discarded / total) ** 0.5 if total > 0 else 0.0, errors)


def merge_exact(adapters: Sequence[Mapping], weights: Sequence[float]) -> MergeResult:
    """The best rank-r adapter for Σ w_j B_j A_j, per module (see the module docstring)."""
    import torch

    normalised = check_compatible(adapters, weights)
    merged, errors = {}, {}
    discarded_total, energy_total = 0.0, 0.0
    for module in modules(adapters[0]):
        rank = adapters[0][module + LORA_A].shape[0]
        stacked_b = torch.cat(
            [w * a[module + LORA_B].double() for w, a in zip(normalised, adapters, strict=True)],
            dim=1,
        )
        stacked_a = torch.cat([a[module + LORA_A].double() for a in adapters], dim=0)
        q_b, r_b = torch.linalg.qr(stacked_b)
        q_a, r_a = torch.linalg.qr(stacked_a.T)
        u, s, vh = torch.linalg.svd(r_b @ r_a.T)
        root = s[:rank].sqrt()
        merged[module + LORA_B] = ((q_b @ u[:, :rank]) * root).float()
        merged[module + LORA_A] = (root[:, None] * (vh[:rank] @ q_a.T)).float()
        energy, discarded = float((s**2).sum()), float((s[rank:] ** 2).sum())
        errors[module] = (discarded / energy) ** 0.5 if energy > 0 else 0.0
        discarded_total, energy_total = discarded_total + discarded, energy_total + energy
    overall = (discarded_total / energy_total) ** 0.5 if energy_total > 0 else 0.0
    return MergeResult(merged, overall, errors)


MERGES = {"factors": merge_factors, "exact": merge_exact}
