"""The tokens of one of this device's splits, as its training run recorded them.

Trust is measured on the trust-validation split and results are reported on the test split;
both must be cut exactly as the training run cut them, or a training document could leak into
the text that judges it. The rule alone is not enough: a small set's empty split is filled by
moving a document out of its hash split (`edgefed.train.split`), so the run's split.json is read
for its rule and for every recorded document's split, and a document keeps the split it was
trained (or held out) in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgefed.device.workspace import Workspace
from edgefed.documents import read_documents
from edgefed.train.blocks import evaluation_stream, token_stream, validation_halves
from edgefed.train.run_folder import RunFolder
from edgefed.train.split import (
    TRUST_VAL,
    SplitRule,
    read_split_rule,
    recorded_splits,
    split_documents,
)


def _split_manifest(run_dir: Path) -> Path | None:
    """The split.json of the run whose adapter is `run_dir` (or `run_dir/..`), if any."""
    for run in (RunFolder(run_dir), RunFolder(run_dir.parent)):
        if run.split.is_file():
            return run.split
    return None


def recorded_rule(run_dir: Path) -> SplitRule:
    """The split rule of the run whose adapter is `run_dir` (or `run_dir/..`); default if none."""
    manifest = _split_manifest(run_dir)
    return read_split_rule(manifest) if manifest else SplitRule()


def recorded_assignment(run_dir: Path) -> dict[str, str]:
    """Document id -> split as the run whose adapter is `run_dir` recorded it; empty if none."""
    manifest = _split_manifest(run_dir)
    return recorded_splits(manifest) if manifest else {}


def _split_documents(workspace: Workspace, run_dir: Path, split: str):
    documents = read_documents(workspace.config.data)
    parts = split_documents(
        documents.documents, recorded_rule(run_dir), recorded_assignment(run_dir)
    )
    return parts[split]


def device_split_tokens(
    workspace: Workspace, run_dir: Path, runtime, split: str, limit: int | None
) -> np.ndarray:
    """BOS-led tokens of `split` of this device's data, at most `limit` (None: all)."""
    documents = _split_documents(workspace, run_dir, split)
    stream = token_stream(documents, lambda t: runtime.tokenize(t, add_bos=False), runtime.eos)
    return evaluation_stream(stream, runtime.bos, limit)


def device_validation_halves(
    workspace: Workspace, run_dir: Path, runtime, limit: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """BOS-led (trust half, selection half) of this device's trust-validation split, each at
    most `limit` tokens (`validation_halves`)."""
    documents = _split_documents(workspace, run_dir, TRUST_VAL)
    halves = validation_halves(documents, lambda t: runtime.tokenize(t, add_bos=False), runtime.eos)
    return tuple(evaluation_stream(half, runtime.bos, limit) for half in halves)
