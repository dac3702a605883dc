"""How a device mixes: one frozen, self-validating value used by every layer.

`edgefed round`, `edgefed aggregate`, `edgefed init` (the federation's default), the
simulation's variants and the Python API all take a `TrustSettings`; nothing else carries a
scheme, temperature, top-k, threshold, merge, clip bound or by-tokens flag on its own, and
nothing else validates them. Unset fields (None) mean "the federation's choice": `resolved`
fills them in from the federation's default, then from the scheme's record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from edgefed.errors import ConfigError
from edgefed.trust.merge import MERGES
from edgefed.trust.schemes import DEFAULT_SCHEME, Normalization, trust_scheme

DEFAULT_MERGE = "factors"
_VARIANT_SYNTAX = "write scheme:t=T:top-k=K:threshold=X:merge=factors|exact"


@dataclass(frozen=True)
class TrustSettings:
    """A trust scheme with its normalisation, merge and defences; see the module docstring."""

    scheme: str | None = None  # None: the federation's
    temperature: float | None = None  # None: the federation's for its scheme, else the scheme's
    top_k: int | None = None  # keep the K most trusted (self always kept)
    threshold: float | None = None  # drop scores below it (self always kept)
    merge: str = DEFAULT_MERGE  # factors (the paper's) or exact (Σ w·B·A, SVD back to rank r)
    clip_norm: float | None = None  # bound on each peer's ‖ΔW‖ before scoring and mixing
    by_tokens: bool = False  # fedavg: weight by training tokens

    def __post_init__(self) -> None:
        if self.scheme is not None:
            trust_scheme(self.scheme)
        if self.temperature is not None and not (
            math.isfinite(self.temperature) and self.temperature > 0
        ):
            raise ConfigError(
                f"temperature {self.temperature:g} is not positive", "e.g. --temperature 0.05"
            )
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top-k {self.top_k} is below 1", "e.g. --top-k 3")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ConfigError(f"threshold {self.threshold} is not finite", "e.g. --threshold -3")
        if self.merge not in MERGES:
            raise ConfigError(f"unknown merge '{self.merge}'", f"choose one of {', '.join(MERGES)}")
        if self.clip_norm is not None and not (
            math.isfinite(self.clip_norm) and self.clip_norm > 0
        ):
            raise ConfigError(
                f"--clip-norm {self.clip_norm:g} is not positive", "e.g. --clip-norm 2"
            )

    def resolved(self, default: TrustSettings | None = None) -> TrustSettings:
        """These settings with the scheme and temperature filled in: from `default` (the
        federation's), else DEFAULT_SCHEME and the scheme's measured temperature."""
        default = default or TrustSettings()
        scheme = self.scheme or default.scheme or DEFAULT_SCHEME
        temperature = self.temperature
        if temperature is None and scheme == default.scheme:
            temperature = default.temperature
        if temperature is None:
            temperature = trust_scheme(scheme).default_temperature or 1.0
        return replace(self, scheme=scheme, temperature=temperature)

    @property
    def normalization(self) -> Normalization:
        """top-k, threshold and the temperature these settings resolve to."""
        return Normalization(
            temperature=self.resolved().temperature, top_k=self.top_k, threshold=self.threshold
        )

    def federation_default(self) -> dict:
        """What a federation manifest records as its devices' default: scheme, and temperature
        when one was chosen (else each device uses the scheme's measured one)."""
        scheme = self.scheme or DEFAULT_SCHEME
        return {"scheme": scheme} | (
            {"temperature": self.temperature} if self.temperature is not None else {}
        )

    @classmethod
    def from_federation(cls, trust: dict | None) -> TrustSettings:
        trust = trust or {}
        return cls(scheme=trust.get("scheme"), temperature=trust.get("temperature"))

    @property
    def label(self) -> str:
        """`perplexity:t=0.05:merge=exact`: the simulation's name for a variant (`parse`)."""
        parts = [self.scheme or DEFAULT_SCHEME]
        for key, value in (("t", self.temperature), ("top-k", self.top_k),
                           ("threshold", self.threshold)):  # fmt: skip
            if value is not None:
                parts.append(f"{key}={value:g}")
        if self.merge != DEFAULT_MERGE:
            parts.append(f"merge={self.merge}")
        return ":".join(parts)

    @classmethod
    def parse(cls, text: str) -> TrustSettings:
        """One `label` back into settings; ConfigError for anything unknown."""
        scheme, *options = text.strip().split(":")
        trust_scheme(scheme)
        values: dict = {}
        for option in options:
            key, _, value = option.partition("=")
            try:
                if key == "t":
                    values["temperature"] = float(value)
                elif key == "top-k":
                    values["top_k"] = int(value)
                elif key == "threshold":
                    values["threshold"] = float(value)
                elif key == "merge" and value in MERGES:
                    values["merge"] = value
                else:
                    raise ValueError(key)
            except ValueError as exc:
                raise ConfigError(
                    f"'{option}' in --trust '{text}' is not an option", _VARIANT_SYNTAX
                ) from exc
        return cls(scheme, **values)


def parse_variants(text: str) -> tuple[TrustSettings, ...]:
    """`local,fedavg,perplexity:t=0.05:merge=exact` → settings; ConfigError on anything unknown
    and on repeated variants."""
    variants = tuple(TrustSettings.parse(item) for item in text.split(",") if item.strip())
    labels = [v.label for v in variants]
    if not variants or len(set(labels)) != len(labels):
        raise ConfigError("--trust needs distinct variants", "e.g. --trust local,fedavg,perplexity")
    return variants
