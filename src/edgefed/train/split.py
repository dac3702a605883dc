"""Train / trust-validation / test splits by a seeded hash of each document's text.

A document's split comes from (seed, its own text): hash them, read the hash as a number u in
[0, 1), and cut [0, 1) into test | trust-val | train. Adding or removing files does not move
another document, so a device that gains data keeps its old trust-validation and test sets and
its earlier numbers stay comparable. Three splits, not two: the text that chooses trust weights
must not be the text that reports the result (a mistake of the paper's public code).

A small set can leave a split empty by chance (28 documents at 10%/10% leave one empty about one
time in ten), so an empty split is filled: from the largest split, the document whose u lies
nearest the empty split's interval moves into it (a document not recorded yet, never a recorded
one), until no split is empty. Any 3 documents therefore split; a set that fills every split by
hash is split by the hash alone, so large sets split as they always did; fewer than 3 documents
cannot be split.

Which document fills a gap depends on the whole set, so for small sets the assignment is kept
through its record rather than the hash: the split is recorded (`split.json`), every later split
of the same data (a resumed run, the next round, the trust and test text) passes the recorded
entries back, and a recorded document keeps its recorded split whatever is added. A later run on
the same record must use the same rule, and the record refuses to move a recorded document.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from edgefed.atomic import atomic_write_text
from edgefed.documents import Document
from edgefed.errors import ConfigError, DataError, ModelFormatError
from edgefed.plural import counted

TRAIN, TRUST_VAL, TEST = "train", "trust-val", "test"
SPLITS = (TRAIN, TRUST_VAL, TEST)
SPLIT_FORMAT_VERSION = 1
MIN_DOCUMENTS = len(SPLITS)  # one for each split
_FILL_ORDER = (TEST, TRUST_VAL, TRAIN)  # which empty split is filled first


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

    def position(self, document_id: str) -> float:
        """The document's u in [0, 1): a seeded hash of its id."""
        digest = hashlib.sha256(f"edgefed-split:{self.seed}:{document_id}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2.0**64

    def interval(self, split: str) -> tuple[float, float]:
        """The [low, high) share of [0, 1) whose documents go to `split` by hash."""
        train_from = self.test_fraction + self.val_fraction
        return {
            TEST: (0.0, self.test_fraction),
            TRUST_VAL: (self.test_fraction, train_from),
            TRAIN: (train_from, 1.0),
        }[split]

    def distance(self, document_id: str, split: str) -> float:
        """How far the document's u lies from `split`'s interval (0 inside it)."""
        u = self.position(document_id)
        low, high = self.interval(split)
        return max(low - u, u - high, 0.0)

    def split_of(self, document_id: str) -> str:
        """The document's split by hash alone."""
        u = self.position(document_id)
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


_MORE_DOCUMENTS = (
    "add documents (a .txt/.md file is one document, a long one is cut into blocks; a .jsonl "
    "line or .csv row is one)"
)


def split_documents(
    documents: Sequence[Document], rule: SplitRule, recorded: Mapping[str, str] | None = None
) -> DataSplit:
    """Assign every document to its split: its `recorded` split (id -> split name, e.g. from
    `recorded_splits`) when it has one, else its hash split; then fill any empty split.

    Raises DataError for fewer than 3 documents, and when an empty split could only be filled
    by moving a recorded document.
    """
    recorded = recorded or {}
    if len(documents) < MIN_DOCUMENTS:
        raise DataError(
            f"a split is empty: {counted(len(documents), 'document')} in all, and at least "
            f"{MIN_DOCUMENTS} are needed (one each for {', '.join(SPLITS)})",
            _MORE_DOCUMENTS,
        )
    assigned = {d.id: recorded.get(d.id) or rule.split_of(d.id) for d in documents}
    sizes = {name: 0 for name in SPLITS}
    for name in assigned.values():
        sizes[name] += 1
    while empty := [name for name in _FILL_ORDER if not sizes[name]]:
        target = empty[0]
        movable = [d for d in documents if d.id not in recorded and sizes[assigned[d.id]] >= 2]
        if not movable:
            raise DataError(
                f"the {target} split is empty: the documents recorded in it are gone from the "
                "data, and no document that is not recorded yet can take their place "
                f"({counted(len(documents), 'document')} in all)",
                "put those documents back or add new ones, or start over in a new output "
                "folder or workspace",
            )
        # the largest split gives the document whose u lies nearest the empty split's interval
        chosen = min(
            movable,
            key=lambda d: (-sizes[assigned[d.id]], rule.distance(d.id, target), d.id),
        )
        sizes[assigned[chosen.id]] -= 1
        sizes[target] += 1
        assigned[chosen.id] = target
    parts: dict[str, list[Document]] = {name: [] for name in SPLITS}
    for document in documents:
        parts[assigned[document.id]].append(document)
    return DataSplit(rule=rule, parts={name: tuple(docs) for name, docs in parts.items()})


def _read_manifest(manifest_path: Path) -> tuple[SplitRule, dict[str, dict[str, str]]]:
    """A split manifest's rule and entries; ModelFormatError when it is not one of ours."""
    try:
        old = json.loads(manifest_path.read_text(encoding="utf-8"))
        if old.get("format", SPLIT_FORMAT_VERSION) != SPLIT_FORMAT_VERSION:
            raise ValueError(f"format {old.get('format')}, not {SPLIT_FORMAT_VERSION}")
        entries = dict(old["documents"])
        for identity, entry in entries.items():
            if entry["split"] not in SPLITS:
                raise ValueError(f"document {identity[:12]} is in an unknown split")
        return SplitRule(**old["rule"]), entries
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelFormatError(
            f"{manifest_path} is not a valid split manifest ({exc})",
            "restore it, or use a new output folder",
        ) from exc


def read_split_rule(path: str | os.PathLike[str]) -> SplitRule:
    """The rule a split manifest (a run's split.json) was made with."""
    return _read_manifest(Path(path))[0]


def recorded_splits(path: str | os.PathLike[str]) -> dict[str, str]:
    """Document id -> split of a split manifest, for `split_documents`; empty when none exists.

    Raises ModelFormatError on an unreadable manifest.
    """
    manifest_path = Path(path)
    if not manifest_path.exists():
        return {}
    return {
        identity: entry["split"] for identity, entry in _read_manifest(manifest_path)[1].items()
    }


def record_split(split: DataSplit, path: str | os.PathLike[str]) -> None:
    """Write the split manifest, after checking it against the one already there.

    The old manifest's rule must be the same, and every recorded document still present must
    be in its recorded split (the split was made with `recorded_splits` of this manifest);
    documents no longer present stay listed. Raises DataError on a different rule or a moved
    document, and ModelFormatError on an unreadable manifest.
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
            old_entry = entries.get(document.id)
            if old_entry is not None and old_entry["split"] != name:
                raise DataError(
                    f"{document.source} is recorded in the {old_entry['split']} split of "
                    f"{manifest_path}, and this split puts it in {name}",
                    "split with the manifest's recorded entries, or use a new output folder",
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
