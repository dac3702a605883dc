"""Train / trust-validation / test splits by a seeded hash of each document's text.

A document's split depends only on (seed, its own text): hash them, read the hash as a number
u in [0, 1), and cut [0, 1) into test | trust-val | train. Adding or removing files never moves
another document, so a device that gains data keeps its old trust-validation and test sets and
its earlier numbers stay comparable. Three splits, not two: the text that chooses trust weights
must not be the text that reports the result (a mistake of the paper's public code).

The split is recorded in the workspace (`split.json`); a later run on the same workspace must use
the same rule, and is checked to have kept every recorded document in its split.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from edgefed.atomic import atomic_write_text
from edgefed.documents import Document
from edgefed.errors import ConfigError, DataError, ModelFormatError

TRAIN, TRUST_VAL, TEST = "train", "trust-val", "test"
SPLITS = (TRAIN, TRUST_VAL, TEST)
SPLIT_FORMAT_VERSION = 1


@dataclass(frozen=True)
class SplitRule:
    """Which share of documents goes to trust-validation and to test, under which seed."""

    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.1

    def __post_init__(self) -> None:
        if (
            self.val_fraction <= 0
            or self.test_fraction <= 0
            or self.val_fraction + self.test_fraction >= 1
        ):
            raise ConfigError(
                f"split fractions val={self.val_fraction}, test={self.test_fraction} must be "
                "positive and leave a share for training",
                "e.g. --val-fraction 0.1 --test-fraction 0.1",
            )

    def split_of(self, document_id: str) -> str:
        digest = hashlib.sha256(f"edgefed-split:{self.seed}:{document_id}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2.0**64
        if u < self.test_fraction:
            return TEST
        if u < self.test_fraction + self.val_fraction:
            return TRUST_VAL
        return TRAIN


@dataclass(frozen=True)
class DataSplit:
    """Documents per split, in the order they were read."""

    rule: SplitRule
    parts: dict[str, tuple[Document, ...]]

    def __getitem__(self, split: str) -> tuple[Document, ...]:
        return self.parts[split]


def split_documents(documents: Sequence[Document], rule: SplitRule) -> DataSplit:
    """Assign every document to its split; raise DataError when a split ends up empty."""
    parts: dict[str, list[Document]] = {name: [] for name in SPLITS}
    for document in documents:
        parts[rule.split_of(document.id)].append(document)
    for name in SPLITS:
        if not parts[name]:
            raise DataError(
                f"the {name} split is empty ({len(documents)} document(s) in all; split by "
                f"hash with val {rule.val_fraction:g}, test {rule.test_fraction:g})",
                "add documents (a .txt/.md file is one document; a .jsonl line or .csv row is "
                "one) or raise --val-fraction/--test-fraction",
            )
    return DataSplit(rule=rule, parts={name: tuple(docs) for name, docs in parts.items()})


def _read_manifest(manifest_path: Path) -> tuple[SplitRule, dict[str, dict[str, str]]]:
    """A split manifest's rule and entries; ModelFormatError when it is not one of ours."""
    try:
        old = json.loads(manifest_path.read_text(encoding="utf-8"))
        if old.get("format", SPLIT_FORMAT_VERSION) != SPLIT_FORMAT_VERSION:
            raise ValueError(f"format {old.get('format')}, not {SPLIT_FORMAT_VERSION}")
        return SplitRule(**old["rule"]), dict(old["documents"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelFormatError(
            f"{manifest_path} is not a valid split manifest ({exc})",
            "restore it, or use a new output folder",
        ) from exc


def read_split_rule(path: str | os.PathLike[str]) -> SplitRule:
    """The rule a split manifest (a run's split.json) was made with."""
    return _read_manifest(Path(path))[0]


def record_split(split: DataSplit, path: str | os.PathLike[str]) -> None:
    """Write the split manifest, after checking it against the one already there.

    The old manifest's rule must be the same (then no recorded document can have moved, the rule
    being a pure function of each document); documents no longer present stay listed.
    Raises DataError on a different rule and ModelFormatError on an unreadable manifest.
    """
    manifest_path = Path(path)
    entries: dict[str, dict[str, str]] = {}
    if manifest_path.exists():
        old_rule, entries = _read_manifest(manifest_path)
        if old_rule != split.rule:
            raise DataError(
                f"{manifest_path} was split with {asdict(old_rule)}, not {asdict(split.rule)}",
                "use the same --split-seed/--val-fraction/--test-fraction, or a new output folder",
            )
    for name, documents in split.parts.items():
        for document in documents:
            entries[document.id] = {"split": name, "source": document.source}
    manifest = {
        "format": SPLIT_FORMAT_VERSION,
        "rule": asdict(split.rule),
        "counts": {name: len(docs) for name, docs in split.parts.items()},
        "documents": entries,
    }
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
