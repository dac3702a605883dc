"""How sure a trust score is: the standard error of a peer's score relative to the device's own.

A runtime scheme's score is a mean over the tokens (or positions) of one text, and every
adapter is scored on the same tokens, so two adapters are best compared by their per-token
differences (paired): the text's own hard and easy passages, which move both losses alike,
cancel. Neighbouring tokens are not independent (a hard sentence is hard for several tokens),
so the error is estimated by batch means: the differences are averaged over consecutive
batches of BATCH_TOKENS tokens and the standard error is that of the batch means. The
runtime's own floor (mathematically equal adapters do not give bit-equal losses on a quantized
base) is added in quadrature: no difference below it can be told from zero.
"""

from __future__ import annotations

import math

import numpy as np

from edgefed.errors import DataError
from edgefed.plural import counted

BATCH_TOKENS = 32  # consecutive tokens averaged into one batch mean
MIN_BATCHES = 4  # fewer batches than this: per-token differences, as if independent
# about 0.004 nats of mean loss separate two equal encodings of one adapter on the Q8_0
# runtime copy (docs/measurements/runtime.md, "Noise floor of trust scores")
PERPLEXITY_NOISE_FLOOR = 0.004
# a floor for the mean total-variation distance, so that a peer identical to the device on
# every position still has a positive error; below every distance measured between peers
PREDICTION_NOISE_FLOOR = 0.001


def paired_standard_error(own: np.ndarray, peer: np.ndarray, floor: float) -> float:
    """Standard error of mean(peer) − mean(own) over the same positions, floor included."""
    if own.shape != peer.shape or own.ndim != 1:
        raise ValueError("paired values need the same positions")
    if len(own) < 2:
        raise DataError(
            f"a trust score over {counted(len(own), 'token')} has no standard error",
            "score trust on more tokens (--val-tokens 16 or more)",
        )
    differences = np.asarray(peer, dtype=np.float64) - np.asarray(own, dtype=np.float64)
    batches = len(differences) // BATCH_TOKENS
    if batches >= MIN_BATCHES:
        means = differences[: batches * BATCH_TOKENS].reshape(batches, BATCH_TOKENS).mean(axis=1)
        error = float(means.std(ddof=1) / math.sqrt(batches))
    else:
        error = float(differences.std(ddof=1) / math.sqrt(len(differences)))
    return math.hypot(error, floor)
