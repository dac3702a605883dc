"""Norm clipping of incoming adapters (`--clip-norm`): a bound on how far one peer can pull.

A peer's adapter enters the mix with weight w_ij, so a peer that publishes a ΔW a hundred times
larger than anyone's moves the mix a hundred times further than its weight suggests. Clipping
rescales each peer's B (and so its ΔW = B·A, linearly) to Frobenius norm at most the bound before
trust is scored and the mix is made; the device's own adapter is never touched. The norm is
that of the stacked ΔW over all modules, computed through r × r Grams (`delta_inner`), without
the LoRA scale alpha/r. `trust.json` records every norm, so a bound can be chosen from the
honest devices' norms.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from edgefed.trust.merge import LORA_B
from edgefed.trust.similarity import delta_inner


def delta_norm(adapter: Mapping) -> float:
    """‖ΔW‖_F of the adapter, all modules stacked."""
    return math.sqrt(max(delta_inner(adapter, adapter), 0.0))


def clip_peers(
    adapters: Mapping[str, Mapping], own: str, bound: float | None
) -> tuple[dict[str, Mapping], dict[str, float]]:
    """Every adapter with its ΔW norm; peers over `bound` rescaled onto it (None: unclipped).
    A non-finite norm is left for the trust scheme, which gives such an adapter weight 0."""
    norms = {device: delta_norm(adapter) for device, adapter in adapters.items()}
    if bound is None:
        return dict(adapters), norms
    clipped = {}
    for device, adapter in adapters.items():
        norm = norms[device]
        if device == own or not math.isfinite(norm) or norm <= bound:
            clipped[device] = adapter
            continue
        scale = bound / norm
        clipped[device] = {
            name: tensor * scale if name.endswith(LORA_B) else tensor
            for name, tensor in adapter.items()
        }
    return clipped, norms
