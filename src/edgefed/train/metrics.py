"""metrics.json: what a finished training run did, and the figures a round publishes from it.

Written last by `train_adapter`: its presence means the run is complete. Only two of its
figures ever leave a device (`published_metrics`): the training token count (for
token-weighted FedAvg) and the trust-validation perplexity.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from edgefed.record_file import RecordFile


@dataclass(frozen=True)
class ValScore:
    """The trust-validation perplexity of the base and of the trained adapter (llama.cpp)."""

    split: str
    runtime_quant: str
    base_perplexity: float
    perplexity: float
    tokens_scored: int


@dataclass(frozen=True)
class TrainMetrics(RecordFile):
    FILE = "metrics.json"
    FORMAT = 1
    KIND = "training metrics"

    base: dict  # {"path", "sha256"}
    run: dict  # what a resume must match: base, data and config fingerprints, LoRA, precision
    from_adapter: str | None
    data: dict  # documents and tokens per split, skipped files, duplicates, train blocks
    steps: int
    tokens_seen: int
    train_seconds: float
    train_tokens_per_second: float
    loss_curve: list
    val: ValScore
    wall_seconds: float
    peak_rss_bytes: int
    # what the run kept and why (`StopOutcome.as_dict`); absent before runs stopped at best
    stopping: dict | None = None

    @classmethod
    def from_dict(cls, data: dict) -> TrainMetrics:
        values = {
            f.name: data[f.name] for f in fields(cls) if f.name in data or f.name != "stopping"
        }
        return cls(**values | {"val": ValScore(**data["val"])})

    def published_metrics(self) -> tuple[int, dict]:
        """(training tokens, the metrics a manifest carries): nothing else leaves the device."""
        return self.tokens_seen, {"val_perplexity": self.val.perplexity}
