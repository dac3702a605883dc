"""The PyTorch side: the NF4 training copy's companions (perplexity now, the QLoRA loop later)."""
