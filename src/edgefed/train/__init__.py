"""The PyTorch side: QLoRA training of one adapter in its run folder, resumable.

`train_adapter` runs over a `edgefed.loaded_base.LoadedBase`; torch loads only when it trains.
"""

from edgefed.train.loop import TrainConfig, TrainingInterrupted, TrainProgress
from edgefed.train.metrics import TrainMetrics
from edgefed.train.run import SplitSummary, TrainResult, train_adapter
from edgefed.train.run_folder import RunFolder
from edgefed.train.split import SplitRule

__all__ = [
    "RunFolder",
    "SplitRule",
    "SplitSummary",
    "TrainConfig",
    "TrainMetrics",
    "TrainProgress",
    "TrainResult",
    "TrainingInterrupted",
    "train_adapter",
]
