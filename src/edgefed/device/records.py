"""The documents a device writes into each round folder (`Workspace` says where).

trust.json       TrustRecord: the trust row, how it was normalised and mixed, the peers used
evaluation.json  EvaluationRecord: base, local and aggregated perplexity on the test split
round.json       RoundRecord: which steps finished, when, and what they did
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgefed.record_file import RecordFile

ROUND_STEPS = ("train", "publish", "pull", "aggregate", "evaluate")


@dataclass(frozen=True)
class TrustRecord(RecordFile):
    FILE = "trust.json"
    KIND = "trust row"
    UNVERSIONED_IS = 1
    FIX = "restore it, or aggregate the round again with `edgefed aggregate`"

    round: int
    scheme: str
    devices: list[str]
    scores: list[float | None]
    weights: list[float]
    normalization: dict  # temperature, top_k, threshold, se_temperature
    merge: str
    relative_error: float
    peers_used: list[str]
    delta_norms: dict[str, float] = field(default_factory=dict)  # absent before --clip-norm
    clip_norm: float | None = None
    # the round each device's mixed adapter is from (a peer's may be older: asynchronous
    # mixing); absent before it, when every adapter was of the round itself
    adapter_rounds: dict[str, int] = field(default_factory=dict)
    # each score's standard error relative to the device's own (runtime schemes; None for
    # itself); absent before they were measured
    errors: list[float | None] = field(default_factory=list)
    # auto trust: every candidate mix tried, the chosen one first, each with its weights and
    # its loss on the selection tokens (`trust.choose`); empty for the fixed schemes
    candidates: list[dict] = field(default_factory=list)
    # fedsa: the weights the B factors were mixed by (A's are `weights`); empty otherwise
    b_weights: list[float] = field(default_factory=list)

    def weights_by_device(self) -> dict[str, float]:
        return dict(zip(self.devices, self.weights, strict=True))

    def adapter_round(self, device: str) -> int:
        """The round of the adapter this row mixed for `device` (older when it was late)."""
        return self.adapter_rounds.get(device, self.round)

    def row(self) -> dict:
        """What an evaluation and the round record repeat of it."""
        return {
            "scheme": self.scheme,
            "devices": self.devices,
            "weights": self.weights,
            "adapter_rounds": [self.adapter_round(d) for d in self.devices],
        }


@dataclass(frozen=True)
class EvaluationRecord(RecordFile):
    FILE = "evaluation.json"
    KIND = "round evaluation"
    UNVERSIONED_IS = 1
    FIX = "delete it; `edgefed evaluate --round R` writes it again"

    round: int
    device: str
    split: str
    tokens_scored: int
    runtime_quant: str
    models: dict[str, dict]  # base / local / aggregated -> {"perplexity", "mean_nll"}
    trust: dict  # {"scheme", "devices", "weights"}

    def perplexities(self) -> dict[str, float]:
        return {name: m["perplexity"] for name, m in self.models.items()}


@dataclass(frozen=True)
class RoundRecord(RecordFile):
    FILE = "round.json"
    KIND = "round record"
    UNVERSIONED_IS = 1
    FIX = "delete it; `edgefed round --round R` recognises the finished steps by their outputs"

    round: int
    steps: dict[str, dict] = field(default_factory=dict)  # step -> its details and "finished"

    @classmethod
    def from_dict(cls, data: dict) -> RoundRecord:
        steps = dict(data["steps"])
        if "sync" in steps:  # before publish and pull were two steps, one "sync" did both
            sync = steps.pop("sync")
            steps = (
                {"train": steps.get("train")}
                | {
                    "publish": {"finished": sync.get("finished")},
                    "pull": sync,
                }
                | steps
            )
            steps = {k: v for k, v in steps.items() if v is not None}
        return cls(round=int(data["round"]), steps=steps)

    def is_finished(self) -> bool:
        return ROUND_STEPS[-1] in self.steps
