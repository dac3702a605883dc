"""edgefed: personalised collaborative fine-tuning of a small LLM on devices that keep their data.

Importing the package is light on purpose: torch, transformers, bitsandbytes and llama.cpp
load only in the modules that use them, so the CLI starts fast and `--help` needs none of them.
"""

from edgefed.errors import EdgefedError

__version__ = "0.1.0"
__all__ = ["EdgefedError", "__version__"]
