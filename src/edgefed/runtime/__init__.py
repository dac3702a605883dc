"""The llama.cpp side of edgefed, and the only package that imports llama-cpp-python.

`LlamaRuntime` loads one quantized base once and evaluates any number of GGUF LoRA adapters over
it by swapping them in and out; `requantize` is llama.cpp's own quantizer.
"""

from edgefed.runtime.llama import Adapter, LlamaRuntime, ScoreJob, TopK
from edgefed.runtime.quantize import (
    DEFAULT_RUNTIME_QUANT,
    KEEP,
    QUANT_TYPES,
    requantize,
    runtime_copy,
)
from edgefed.scoring import PerplexityResult

__all__ = [
    "DEFAULT_RUNTIME_QUANT",
    "KEEP",
    "QUANT_TYPES",
    "Adapter",
    "LlamaRuntime",
    "PerplexityResult",
    "ScoreJob",
    "TopK",
    "requantize",
    "runtime_copy",
]
