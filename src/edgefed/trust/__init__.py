"""Trust: how much each device trusts each peer (scores, normalisation) and the mix it builds.

Pure functions over name-keyed LoRA tensors; the llama.cpp-measured schemes (perplexity,
prediction) feed their scores into the same `trust_row`. `TrustSettings` is how every layer
says which scheme and normalisation to use; `SCHEMES` holds one `TrustScheme` record each,
added by `register_scheme`.
"""

from edgefed.trust.merge import MERGES
from edgefed.trust.schemes import (
    SCHEMES,
    Needs,
    Normalization,
    TrustInputs,
    TrustRow,
    TrustScheme,
    compute_trust,
    register_scheme,
)
from edgefed.trust.settings import TrustSettings, parse_variants

__all__ = [
    "MERGES",
    "SCHEMES",
    "Needs",
    "Normalization",
    "TrustInputs",
    "TrustRow",
    "TrustScheme",
    "TrustSettings",
    "compute_trust",
    "parse_variants",
    "register_scheme",
]
