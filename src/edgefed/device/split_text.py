"""The tokens of one of this device's splits, cut by the rule its training run recorded.

Trust is measured on the trust-validation split and results are reported on the test split;
both must be cut by the very rule the training run used, or a training document could leak
into the text that judges it. The rule is read from the run's split.json.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgefed.device.workspace import Workspace
from edgefed.documents import read_documents
from edgefed.train.blocks import evaluation_stream, token_stream
from edgefed.train.run_folder import RunFolder
from edgefed.train.split import SplitRule, read_split_rule, split_documents


def recorded_rule(run_dir: Path) -> SplitRule:
    """The split rule of the run whose adapter is `run_dir` (or `run_dir/..`); default if none."""
    for run in (RunFolder(run_dir), RunFolder(run_dir.parent)):
        if run.split.is_file():
            return read_split_rule(run.split)
    return SplitRule()


def device_split_tokens(
    workspace: Workspace, run_dir: Path, runtime, split: str, limit: int | None
) -> np.ndarray:
    """BOS-led tokens of `split` of this device's data, at most `limit` (None: all)."""
    documents = read_documents(workspace.config.data)
    parts = split_documents(documents.documents, recorded_rule(run_dir))
    stream = token_stream(parts[split], lambda t: runtime.tokenize(t, add_bos=False), runtime.eos)
    return evaluation_stream(stream, runtime.bos, limit)
