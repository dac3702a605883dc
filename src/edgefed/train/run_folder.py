"""The layout of one training run's folder, owned here as `sync.layout` owns the store's.

split.json               the split rule and every document's split (`edgefed.train.split`)
adapter/                 PEFT adapter folder (adapter_config.json, adapter_model.safetensors)
adapter.gguf             the same adapter as a GGUF LoRA for llama.cpp
optimizer.safetensors    AdamW's state, to carry into the next round
metrics.json             written last: its presence means the run is complete
checkpoint.safetensors   while training only
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgefed.train.metrics import TrainMetrics


@dataclass(frozen=True)
class RunFolder:
    root: Path

    @property
    def split(self) -> Path:
        return self.root / "split.json"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def gguf_adapter(self) -> Path:
        return self.root / "adapter.gguf"

    @property
    def optimizer(self) -> Path:
        return self.root / "optimizer.safetensors"

    @property
    def metrics(self) -> Path:
        return self.root / TrainMetrics.FILE

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint.safetensors"

    def is_finished(self) -> bool:
        return self.metrics.is_file()

    def read_metrics(self) -> TrainMetrics:
        return TrainMetrics.read(self.metrics)
