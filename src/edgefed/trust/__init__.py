"""Trust: how much each device trusts each peer (scores, normalisation) and the mix it builds.

Pure functions over name-keyed LoRA tensors; the llama.cpp-measured schemes (perplexity,
prediction) feed their scores into the same `trust_row`.
"""
