"""Pruning a device's workspace: old rounds' bulky files go, every round's records stay.

Each round leaves this device's adapter twice (PEFT folder and GGUF), its optimizer state, the
mix twice, and every peer's adapter: far more than its records, and a device that runs for
months fills its disk. For each finished round older than the newest `keep` finished ones,
pruning deletes

    train/adapter/  train/adapter.gguf  train/optimizer.safetensors  train/checkpoint.safetensors
    aggregated/  aggregated.gguf  peers/*.safetensors
    the temporaries a killed write left there (`edgefed.atomic.find_leftovers`)

and keeps round.json, trust.json, evaluation.json, rejected.json, peers/*.json (the signed
manifests), train/metrics.json and train/split.json: `status`, `trust show` and
`evaluate --round` read only those of a finished round.

Whatever `keep` says, it never touches an unfinished round (nor a folder without round.json),
nor what a round still to run needs from an older one: round r trains from round r-1's
aggregated/ and optimizer.safetensors, and mixes the peers' adapters of rounds
r-max_staleness..r.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from edgefed.atomic import find_leftovers
from edgefed.device.workspace import Workspace
from edgefed.errors import ConfigError

DEFAULT_KEEP = 3


@dataclass(frozen=True)
class PrunedRound:
    """What pruning takes (or took) from one round: paths relative to the workspace."""

    round: int
    paths: list[str]
    bytes: int


@dataclass(frozen=True)
class PruneReport:
    keep: int
    dry_run: bool
    pruned: list[PrunedRound]
    kept: list[int]  # finished rounds kept whole
    unfinished: list[int]  # never touched
    needed: list[str]  # bulky files of pruned rounds kept because a later round needs them

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.pruned)

    def as_dict(self) -> dict:
        return asdict(self) | {"bytes": self.bytes}


def plan_prune(workspace: Workspace, keep: int = DEFAULT_KEEP) -> PruneReport:
    """What `prune_workspace` would delete; deletes nothing. ConfigError when `keep` < 1 (the
    newest finished round is where the next one starts)."""
    if keep < 1:
        raise ConfigError(
            f"--keep {keep} would prune the newest finished round, which the next round "
            "starts from",
            "keep 1 or more rounds",
        )
    rounds = workspace.rounds()
    finished = [r for r in rounds if workspace.read_round_record(r).is_finished()]
    unfinished = [r for r in rounds if r not in finished]
    # every round that may still run: the unfinished ones and the next new one
    coming = set(unfinished) | {max(finished, default=-1) + 1}
    starts = {r - 1 for r in coming}
    staleness = workspace.federation.schedule.max_staleness
    mixed = {r for c in coming for r in range(c - staleness, c + 1)}
    pruned, needed = [], []
    for number in finished[:-keep]:
        run = workspace.train_run(number)
        start = [workspace.aggregated_dir(number), run.optimizer]
        peers = sorted(workspace.peers_dir(number).glob("*.safetensors"))
        still_needed = (start if number in starts else []) + (peers if number in mixed else [])
        folders = (workspace.round_dir(number), run.root, workspace.peers_dir(number))
        bulky = [
            run.adapter,
            run.gguf_adapter,
            run.checkpoint,
            workspace.aggregated_gguf(number),
            *start,
            *peers,
            *(leftover for folder in folders for leftover in find_leftovers(folder)),
        ]
        present = sorted(
            p for p in bulky if p not in still_needed and (p.exists() or p.is_symlink())
        )
        needed += [p for p in still_needed if p.exists()]
        if present:
            pruned.append(
                PrunedRound(
                    round=number,
                    paths=[_relative(p, workspace) for p in present],
                    bytes=sum(_size(p) for p in present),
                )
            )
    return PruneReport(
        keep=keep,
        dry_run=True,
        pruned=pruned,
        kept=finished[-keep:],
        unfinished=unfinished,
        needed=[_relative(p, workspace) for p in needed],
    )


def prune_workspace(
    workspace: Workspace, keep: int = DEFAULT_KEEP, *, dry_run: bool = False
) -> PruneReport:
    """Delete the old rounds' bulky files (see the module docstring); what was deleted, or
    with `dry_run` what would be. A folder goes by a rename first, so a prune killed midway
    leaves a whole folder or a leftover the next prune removes, never half an adapter."""
    report = plan_prune(workspace, keep)
    if dry_run:
        return report
    for pruned in report.pruned:
        for relative in pruned.paths:
            _delete(workspace.root / relative)
    return replace(report, dry_run=False)


def _relative(path: Path, workspace: Workspace) -> str:
    return path.relative_to(workspace.root).as_posix()


def _size(path: Path) -> int:
    if path.is_dir() and not path.is_symlink():
        return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_dir())
    return path.lstat().st_size


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        os.replace(path, aside / path.name)
        shutil.rmtree(aside)
    else:
        path.unlink(missing_ok=True)
