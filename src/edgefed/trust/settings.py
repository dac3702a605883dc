"""How a device mixes: one frozen, self-validating value used by every layer.

`edgefed round`, `edgefed aggregate`, `edgefed init` (the federation's default), the
simulation's variants and the Python API all take a `TrustSettings`; nothing else carries a
scheme, temperature, top-k, threshold, merge, clip bound or by-tokens flag on its own, and
nothing else validates them. Unset fields (None) mean "the federation's choice": `resolved`
fills them in from the federation's default, then from the scheme's record.

The sharpness is one of two: `temperature`, in the scores' own units (nats of mean loss for
perplexity), or `se_temperature`, in standard errors of each peer's paired score difference
(`trust.noise`), which lets the evidence decide how sharp a row may be.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from edgefed.errors import ConfigError
from edgefed.trust.merge import MERGES
from edgefed.trust.schemes import DEFAULT_SCHEME, Normalization, trust_scheme

DEFAULT_MERGE = "factors"
_VARIANT_SYNTAX = "write scheme:t=T|se=Z:top-k=K:threshold=X:merge=factors|exact"


@dataclass(frozen=True)
class TrustSettings:
    """A trust scheme with its normalisation, merge and defences; see the module docstring."""

    scheme: str | None = None  # None: the federation's
    temperature: float | None = None  # None: the federation's for its scheme, else the scheme's
    se_temperature: float | None = None  # a temperature in standard errors instead (se=Z)
    top_k: int | None = None  # keep the K most trusted (self always kept)
    threshold: float | None = None  # drop scores below it (self always kept)
    merge: str = DEFAULT_MERGE  # factors (the paper's) or exact (Σ w·B·A, SVD back to rank r)
    clip_norm: float | None = None  # bound on each peer's ‖ΔW‖ before scoring and mixing
    by_tokens: bool = False  # fedavg: weight by training tokens

    def __post_init__(self) -> None:
        if self.temperature is not None and not (
            math.isfinite(self.temperature) and self.temperature > 0
        ):
            raise ConfigError(
                f"temperature {self.temperature:g} is not positive", "e.g. --temperature 0.05"
            )
        if self.se_temperature is not None and not (
            math.isfinite(self.se_temperature) and self.se_temperature > 0
        ):
            raise ConfigError(
                f"temperature in standard errors {self.se_temperature:g} is not positive",
                "e.g. --se-temperature 2",
            )
        if self.temperature is not None and self.se_temperature is not None:
            raise ConfigError(
                "a temperature and a temperature in standard errors were both given",
                "give one: --temperature T (score units) or --se-temperature Z",
            )
        if self.scheme is not None:
            scheme = trust_scheme(self.scheme)
            if self.se_temperature is not None and not scheme.measures_noise:
                raise ConfigError(
                    f"{self.scheme} trust has no standard errors for a temperature in them",
                    "use --se-temperature with perplexity or prediction trust only",
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

    def _has_sharpness(self) -> bool:
        return self.temperature is not None or self.se_temperature is not None

    def resolved(self, default: TrustSettings | None = None) -> TrustSettings:
        """These settings with the scheme and sharpness filled in: from `default` (the
        federation's), else DEFAULT_SCHEME and the scheme's measured default."""
        default = default or TrustSettings()
        scheme = self.scheme or default.scheme or DEFAULT_SCHEME
        if self._has_sharpness():
            return replace(self, scheme=scheme)
        if scheme == default.scheme and default._has_sharpness():
            return replace(self, scheme=scheme, temperature=default.temperature,
                           se_temperature=default.se_temperature)  # fmt: skip
        record = trust_scheme(scheme)
        if record.default_se_temperature is not None:
            return replace(self, scheme=scheme, se_temperature=record.default_se_temperature)
        return replace(self, scheme=scheme, temperature=record.default_temperature or 1.0)

    @property
    def normalization(self) -> Normalization:
        """top-k, threshold and the sharpness these settings resolve to."""
        resolved = self.resolved()
        return Normalization(
            temperature=resolved.temperature,
            top_k=self.top_k,
            threshold=self.threshold,
            se_temperature=resolved.se_temperature,
        )

    def federation_default(self) -> dict:
        """What a federation manifest records as its devices' default: scheme, and sharpness
        when one was chosen (else each device uses the scheme's measured one)."""
        scheme = self.scheme or DEFAULT_SCHEME
        sharpness = {"temperature": self.temperature, "se_temperature": self.se_temperature}
        return {"scheme": scheme} | {k: v for k, v in sharpness.items() if v is not None}

    @classmethod
    def from_federation(cls, trust: dict | None) -> TrustSettings:
        trust = trust or {}
        return cls(
            scheme=trust.get("scheme"),
            temperature=trust.get("temperature"),
            se_temperature=trust.get("se_temperature"),
        )

    @property
    def label(self) -> str:
        """`perplexity:t=0.05:merge=exact`: the simulation's name for a variant (`parse`)."""
        parts = [self.scheme or DEFAULT_SCHEME]
        for key, value in (("t", self.temperature), ("se", self.se_temperature),
                           ("top-k", self.top_k), ("threshold", self.threshold)):  # fmt: skip
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
                elif key == "se":
                    values["se_temperature"] = float(value)
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
