"""Nothing reaches for a model hub at run time.

edgefed's base model and demo text come inside installed packages, and every model it builds is
built in code. Its libraries still look things up on the Hugging Face Hub on their own: bitsandbytes
(0.50), imported on a CPU with AVX-512 BF16, asks the `kernels` package for a 4-bit matmul kernel
from the Hub repository `kernels-community/quantization-bitsandbytes`, and logs a warning when it
cannot get it (it then uses its own CPU code, which the NF4 copy has always used); `kernels` itself
warns that it skips the Hub's publisher check offline. HF_HUB_OFFLINE makes every such request fail
at once, without a connection; a user who wants the Hub in the same process sets HF_HUB_OFFLINE=0
first."""

from __future__ import annotations

import logging
import os

# bitsandbytes' warning when the Hub kernel is not there, and the `kernels` package's (0.19)
# that it skips the Hub's publisher check offline: expected offline, and not actionable
_QUIET_OFFLINE_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels")


def stay_offline() -> None:
    """Before huggingface_hub is imported: no Hub requests, and no warning about their absence."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name in _QUIET_OFFLINE_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
