"""Clipping and Gaussian noise on the adapter a device publishes (`--dp-clip C --dp-noise z`).

What leaves a device is its adapter θ. Its change from the federation's initial adapter θ₀ (A
from the shared seed, B = 0: public) is clipped to L2 norm C over all tensors, and Gaussian noise
of standard deviation z·C is added to every coordinate:

    released = θ₀ + Δ · min(1, C / ‖Δ‖) + N(0, (z·C)² I),      Δ = θ − θ₀

Any two data sets, however different, give clipped changes at most 2C apart, so one release is
the Gaussian mechanism with sensitivity 2C over the device's *whole* data set, and R releases
(one per round) compose. `epsilon` gives the (ε, δ) bound by Rényi DP (Mironov 2017): the
mechanism has RDP α·(2C)²/(2(zC)²) = 2α/z² per release. Everything derived from the releases
(peers' mixes, trust scores) is post-processing and keeps the bound.

What it does not do, in plain words (docs/guides/privacy-and-poisoned-peers.md): a useful adapter
needs a small z, and then ε is far too large to mean anything formally; the noise is drawn with
torch's generator seeded from the OS's entropy, not with a hardened sampler (floating-point attacks
on naive Gaussian samplers are known); the device's own mix uses its exact adapter, which never
leaves it. The noise is drawn once per round: the release is kept in the run folder and a resumed
publish sends the same bytes, so a crash never releases a second draw.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from edgefed.errors import ConfigError

DEFAULT_DELTA = 1e-5


@dataclass(frozen=True)
class DpNoise:
    """The clipping bound C (L2 over all adapter tensors) and the noise multiplier z."""

    clip: float
    noise: float

    def __post_init__(self) -> None:
        usable = self.clip > 0 and self.noise >= 0 and math.isfinite(self.clip * self.noise)
        if not usable or (self.noise > 0 and self.noise**2 == 0):
            raise ConfigError(
                f"--dp-clip {self.clip:g} / --dp-noise {self.noise:g} cannot be used",
                "give a positive --dp-clip and a non-negative --dp-noise",
            )

    def as_dict(self) -> dict:
        return {"clip": self.clip, "noise": self.noise}

    def describe(self, rounds: int = 10) -> str:
        """One line for the terminal: the formal bound these settings give, and its unit."""
        return (
            f"privacy noise: clip {self.clip:g}, noise x{self.noise:g}: ε = "
            f"{epsilon(self.noise, 1):.3g} per round, {epsilon(self.noise, rounds):.3g} over "
            f"{rounds} rounds (δ = {DEFAULT_DELTA:g}, the device's whole data set as the unit)"
        )


def change_norm(tensors: Mapping, initial: Mapping) -> float:
    """‖θ − θ₀‖₂ over all tensors."""
    return math.sqrt(sum(float((tensors[n].float() - initial[n]).square().sum()) for n in tensors))


def privatize(tensors: Mapping, initial: Mapping, dp: DpNoise) -> tuple[dict, float]:
    """The release of the module docstring, and the norm of the change before clipping."""
    import torch

    norm = change_norm(tensors, initial)
    scale = min(1.0, dp.clip / norm) if norm > 0 else 1.0
    generator = torch.Generator().manual_seed(secrets.randbits(63))
    released = {}
    for name in sorted(tensors):
        change = (tensors[name].float() - initial[name]) * scale
        noise = torch.randn(change.shape, generator=generator) * (dp.noise * dp.clip)
        released[name] = initial[name] + change + noise
    return released, norm


def epsilon(noise: float, releases: int, delta: float = DEFAULT_DELTA) -> float:
    """ε of `releases` Gaussian releases with noise multiplier z at sensitivity 2C, by RDP:
    min over α > 1 of releases·2α/z² + log(1/δ)/(α − 1). Infinite without noise."""
    if noise <= 0:
        return math.inf
    rate = releases * 2.0 / noise**2
    # the minimum over real α is at α* = 1 + sqrt(log(1/δ) / rate)
    alpha = 1.0 + math.sqrt(math.log(1.0 / delta) / rate)
    return rate * alpha + math.log(1.0 / delta) / (alpha - 1.0)
