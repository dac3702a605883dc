"""edgefed: personalised collaborative fine-tuning of a small LLM on devices that keep their data.

Importing the package is light on purpose: torch, transformers, bitsandbytes and llama.cpp
load only in the modules that use them, so the CLI starts fast and `--help` needs none of them.
"""

from edgefed.errors import ConfigError, EdgefedError

__version__ = "0.1.0"
__all__ = ["ConfigError", "EdgefedError", "LoadedBase", "__version__"]


def __getattr__(name: str):
    """`edgefed.LoadedBase` on first use: the package itself imports only the error tree."""
    if name == "LoadedBase":
        from edgefed.loaded_base import LoadedBase

        return LoadedBase
    raise AttributeError(f"module 'edgefed' has no attribute {name!r}")
