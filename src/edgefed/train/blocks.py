"""Token blocks for training and token streams for evaluation, from documents.

Texts are tokenized by the base's own llama.cpp tokenizer, the one that later scores them, so
training and evaluation can never disagree about tokens. Each document ends with EOS and the
documents are concatenated into one stream (packing: no padding wasted on short documents).
A training block is BOS + the next `seq_len - 1` tokens of that stream, so every block looks like
the start of a context, as the evaluation windows do. The last, shorter block is padded and its
padding masked out of the loss, so no text is dropped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from edgefed.documents import Document
from edgefed.errors import DataError

PAD = -1  # marks padding in a block; becomes attention 0 and label -100 in the batch


@dataclass(frozen=True)
class TokenBlocks:
    """(n_blocks, seq_len) int32 token ids, PAD where a short last block was padded."""

    tokens: np.ndarray
    text_tokens: int  # tokens of the documents themselves (EOS included, BOS and PAD not)

    @property
    def count(self) -> int:
        return int(self.tokens.shape[0])

    def fingerprint(self) -> str:
        """sha256 of the blocks: a resumed run checks that it trains on the same data."""
        return hashlib.sha256(np.ascontiguousarray(self.tokens).tobytes()).hexdigest()


def token_stream(
    documents: Sequence[Document], tokenize: Callable[[str], np.ndarray], eos: int
) -> np.ndarray:
    """All documents' tokens, each document followed by EOS, as one int32 array."""
    pieces = [np.append(tokenize(document.text), np.int32(eos)) for document in documents]
    return np.concatenate(pieces).astype(np.int32) if pieces else np.zeros(0, np.int32)


def pack_blocks(stream: np.ndarray, seq_len: int, bos: int) -> TokenBlocks:
    """Cut `stream` into BOS-led blocks of `seq_len` tokens (see the module docstring)."""
    if seq_len < 2:
        raise DataError(f"sequence length {seq_len} is too short", "use --seq-len 2 or more")
    if len(stream) == 0:
        raise DataError("there is no text to train on", "point --data at non-empty text")
    body = seq_len - 1
    n_blocks = -(-len(stream) // body)
    padded = np.full(n_blocks * body, PAD, dtype=np.int32)
    padded[: len(stream)] = stream
    blocks = np.concatenate(
        [np.full((n_blocks, 1), bos, dtype=np.int32), padded.reshape(n_blocks, body)], axis=1
    )
    return TokenBlocks(tokens=blocks, text_tokens=len(stream))


def validation_halves(
    documents: Sequence[Document], tokenize: Callable[[str], np.ndarray], eos: int
) -> tuple[np.ndarray, np.ndarray]:
    """The trust-validation split cut in two disjoint streams: the first half of every
    document (the trust half) and the second half (the selection half).

    Two decisions are made on a device's held-out text: which training step and which trust
    row (fit to the trust half), and which candidate mix to keep (`edgefed.trust.choose`, on
    the selection half). A choice made on the tokens that fitted what it chooses among
    favours whatever fitted them best, so the two get separate tokens. Every document gives
    to both, so a split of one document still feeds both, and each half keeps its text in
    order (natural contexts, unlike interleaved chunks).
    """
    first, second = [], []
    for document in documents:
        tokens = np.append(tokenize(document.text), np.int32(eos)).astype(np.int32)
        middle = len(tokens) // 2
        first.append(tokens[:middle])
        second.append(tokens[middle:])
    empty = np.zeros(0, np.int32)
    return (
        np.concatenate(first) if first else empty,
        np.concatenate(second) if second else empty,
    )


def evaluation_stream(stream: np.ndarray, bos: int, max_tokens: int | None) -> np.ndarray:
    """BOS + the first `max_tokens` tokens of a split's stream (all of it when None)."""
    kept = stream if max_tokens is None else stream[:max_tokens]
    return np.concatenate([[bos], kept]).astype(np.int32)
