"""edgefed: personalised collaborative fine-tuning of a small LLM on devices that keep their data.

Importing the package is light on purpose: torch, transformers, bitsandbytes and llama.cpp
load only in the modules that use them, so the CLI starts fast and `--help` needs none of them.
It sets two things before any library loads: no library may reach for a model hub (`offline`),
and PyTorch puts large tensors on huge pages, which keeps training's memory down (`memory`).
"""

from edgefed.errors import ConfigError, EdgefedError
from edgefed.memory import use_huge_pages_for_tensors
from edgefed.offline import stay_offline

stay_offline()  # before any module imports huggingface_hub, transformers or bitsandbytes
use_huge_pages_for_tensors()  # before torch allocates

__version__ = "0.1.0"
__all__ = ["ConfigError", "EdgefedError", "LoadedBase", "__version__"]


def __getattr__(name: str):
    """`edgefed.LoadedBase` on first use: the package itself imports only the error tree."""
    if name == "LoadedBase":
        from edgefed.loaded_base import LoadedBase

        return LoadedBase
    raise AttributeError(f"module 'edgefed' has no attribute {name!r}")
