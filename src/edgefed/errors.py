"""The one error tree of edgefed.

    EdgefedError                 anything the user can fix; the CLI prints one line, exit code 2
    ├── ConfigError              settings that cannot work together (also a ValueError)
    ├── InputFileError           a path that is missing, unreadable or of the wrong kind
    ├── ModelFormatError         a file that claims to be a model or adapter but is malformed
    ├── UnsupportedModelError    a well-formed model or adapter that edgefed cannot handle
    ├── AdapterMismatchError     an adapter that does not fit the base it is used with
    ├── DataError                text that yields nothing to work on (empty, too short)
    ├── RuntimeBackendError      llama.cpp refused an operation on valid-looking input
    ├── TrainingError            training cannot go on as configured (diverged, wrong resume)
    └── StoreError               the federation store cannot be read or written (folder, relay)
        ├── KeyMissing           (edgefed.sync.store) a key not in the store (yet)
        ├── KeyExists            (edgefed.sync.store) a create-once key already taken
        └── StoreUnreachable     (edgefed.sync.store) no answer after retries: try again later

Outside the tree, on purpose: `edgefed.sync.verify.Rejected` (a peer's adapter refused; logged
in rejected.json, never shown as a failure of this device) and
`edgefed.train.loop.TrainingInterrupted` (a requested stop, not an error).

Every error names the thing at fault (`problem`) and says how to fix it (`fix`, required and
never empty: a test walks every raise site). Errors from the libraries we call (gguf,
safetensors, llama.cpp, httpx, boto) are translated once, where we call them, and chained with
`from exc`, so a traceback or a debugger still shows the original.
"""

from __future__ import annotations


class EdgefedError(Exception):
    """Base of every error a user can act on."""

    def __init__(self, problem: str, fix: str) -> None:
        if not fix or not fix.strip():
            raise TypeError(f"an EdgefedError needs a fix for the user: {problem}")
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}: {fix}")


class ConfigError(EdgefedError, ValueError):
    """Settings that cannot work (a rank of 0, two lengths, an unknown scheme).

    Raised by the frozen settings values themselves (`TrainConfig`, `LoraSpec`, `SplitRule`,
    `TrustSettings`, `DpNoise`), so every caller, the CLI included, gets the same one line
    without converting anything. A ValueError too, as a bad argument value is one.
    """


class InputFileError(EdgefedError):
    """A path given by the user is missing, unreadable, or not what the command needs."""


class ModelFormatError(EdgefedError):
    """A model or adapter file is malformed: wrong magic, truncated, inconsistent."""


class UnsupportedModelError(EdgefedError):
    """A valid model or adapter of a kind edgefed does not support (architecture, DoRA, ...)."""


class AdapterMismatchError(EdgefedError):
    """An adapter whose tensors do not fit the base model it is applied to."""


class DataError(EdgefedError):
    """Text that leaves nothing to evaluate or train on."""


class RuntimeBackendError(EdgefedError):
    """llama.cpp failed on input that passed our own checks."""


class TrainingError(EdgefedError):
    """Training cannot go on as configured: the loss diverged, or a resume does not match."""


class StoreError(EdgefedError):
    """The federation store cannot be read or written: a folder, or a relay and its answers."""
