"""One device's side of a federation: its workspace, and its part in each round.

A round is five steps, one module each, and `run_round` runs them resumably:

    train      `train_round`      local steps from the previous round's mix
    publish    `publish_adapter`  the signed adapter into the store, once
    pull       `pull_round`       the peers' adapters, verified, into the workspace
    aggregate  `aggregate_round`  the trust row and the mix
    evaluate   `evaluate_round`   base, local and mix on the device's own test split
"""

from edgefed.device.aggregate import AggregateResult, aggregate_round, trust_history
from edgefed.device.evaluate import evaluate_round
from edgefed.device.federation import (
    federation_status,
    init_federation,
    join_federation,
    read_federation,
)
from edgefed.device.publish import publish_adapter
from edgefed.device.pull import PullReport, pull_round
from edgefed.device.records import EvaluationRecord, RoundRecord, TrustRecord
from edgefed.device.round import RoundOptions, RoundReport, run_round
from edgefed.device.train import train_round
from edgefed.device.workspace import DeviceConfig, Workspace, find_workspace

__all__ = [
    "AggregateResult",
    "DeviceConfig",
    "EvaluationRecord",
    "PullReport",
    "RoundOptions",
    "RoundRecord",
    "RoundReport",
    "TrustRecord",
    "Workspace",
    "aggregate_round",
    "evaluate_round",
    "federation_status",
    "find_workspace",
    "init_federation",
    "join_federation",
    "publish_adapter",
    "pull_round",
    "read_federation",
    "run_round",
    "train_round",
    "trust_history",
]
