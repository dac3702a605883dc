"""Base models and adapters as files: GGUF inspection, HF -> GGUF, PEFT LoRA -> GGUF LoRA, the
training copies (the GGUF's own blocks, NF4, fp32).

Nothing here runs a model; llama.cpp itself is reached only through `edgefed.runtime`.
"""

from edgefed.quant.gguf_file import BaseInfo, read_base_info, resolve_base
from edgefed.quant.lora_gguf import convert_lora_to_gguf

__all__ = ["BaseInfo", "convert_lora_to_gguf", "read_base_info", "resolve_base"]
