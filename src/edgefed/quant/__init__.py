"""Base models and adapters as files: GGUF inspection, HF -> GGUF, PEFT LoRA -> GGUF LoRA, NF4 copy.

Nothing here runs a model; llama.cpp itself is reached only through `edgefed.runtime`.
"""
