"""Perplexity of a transformers model by the same scoring rule as the llama.cpp runtime.

Used to check the runtime against PyTorch and to measure the training copy; it shares
`edgefed.scoring.windows` with the runtime so both score exactly the same tokens.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from edgefed.errors import DataError
from edgefed.plural import counted
from edgefed.scoring import PerplexityResult, windows


def torch_token_logprobs(model, tokens: Sequence[int] | np.ndarray, *, window: int, stride: int):
    """log p(token | context) for every scored token, in order (float64 numpy array)."""
    import torch

    ids = np.asarray(tokens, dtype=np.int64)
    if len(ids) < 2:
        raise DataError(
            f"the text has {counted(len(ids), 'token')}; at least 2 are needed", "give more text"
        )
    device = next(model.parameters()).device
    out: list[np.ndarray] = []
    was_training = model.training
    model.eval()  # dropout off: METHOD.md, evaluation is deterministic
    try:
        with torch.inference_mode():
            for w in windows(len(ids), window, stride):
                chunk = torch.from_numpy(ids[w.start : w.end]).to(device)[None]
                logits = model(chunk).logits[0, w.first_scored : -1].float()
                logprobs = torch.log_softmax(logits, dim=-1)
                targets = chunk[0, w.first_scored + 1 :]
                out.append(logprobs.gather(1, targets[:, None])[:, 0].double().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out)


def torch_perplexity(
    model, tokens: Sequence[int] | np.ndarray, *, window: int, stride: int | None = None
) -> PerplexityResult:
    """Perplexity of `tokens` under a transformers causal LM (adapter included, if any)."""
    step = stride or window // 2
    started = time.perf_counter()
    logprobs = torch_token_logprobs(model, tokens, window=window, stride=step)
    seconds = time.perf_counter() - started
    return PerplexityResult.from_logprobs(logprobs, len(tokens), window, step, seconds)
