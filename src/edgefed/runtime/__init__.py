"""The llama.cpp side of edgefed, and the only package that imports llama-cpp-python.

`LlamaRuntime` loads one quantized base once and evaluates any number of GGUF LoRA adapters over
it by swapping them in and out; `requantize` is llama.cpp's own quantizer.
"""

from edgefed.runtime.llama import Adapter, LlamaRuntime, PerplexityResult, TopK
from edgefed.runtime.quantize import QUANT_TYPES, requantize

__all__ = ["QUANT_TYPES", "Adapter", "LlamaRuntime", "PerplexityResult", "TopK", "requantize"]
