"""Counted nouns in messages: "1 peer adapter", "2 peer adapters", never "1 training steps"."""

from __future__ import annotations


def counted(number: int, noun: str, plural: str | None = None) -> str:
    """`number` and `noun`, plural unless it is 1 (`plural` for nouns without a plain s)."""
    return f"{number:,} {noun if number == 1 else plural or noun + 's'}"
