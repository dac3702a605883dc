"""GGUF -> GGUF requantization with llama.cpp's own quantizer (`llama_model_quantize`).

It lives in the runtime package because it is llama.cpp code: the runtime is the one place that
talks to llama-cpp-python. The output is written to a temporary file and renamed into place,
so a failed or interrupted quantization never leaves a partial model behind.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from pathlib import Path

from edgefed.atomic import atomic_path
from edgefed.errors import ConfigError, InputFileError, RuntimeBackendError
from edgefed.home import cache_dir
from edgefed.quant.gguf_file import read_base_info, require_file, sha256_file
from edgefed.runtime.backend import ensure_backend, take_recent_errors
from edgefed.runtime.llama import default_threads

# The quant type the runtime evaluates with unless told otherwise, chosen by bench/runtime.py:
# on the embedded Q4_1 base a Q8_0 copy has the same perplexity (it is made from the Q4_1
# values) and runs 2.3x faster on x86, where llama.cpp repacks Q8_0/Q4_0 but not Q4_1.
# Q4_0 is faster still but re-rounding Q4_1 to it costs +22% perplexity. "keep" uses the file.
DEFAULT_RUNTIME_QUANT = "q8_0"
KEEP = "keep"

# user-facing name -> llama.cpp's LLAMA_FTYPE_* constant suffix
QUANT_TYPES: dict[str, str] = {
    "f32": "ALL_F32",
    "f16": "MOSTLY_F16",
    "bf16": "MOSTLY_BF16",
    "q8_0": "MOSTLY_Q8_0",
    "q6_k": "MOSTLY_Q6_K",
    "q5_k_m": "MOSTLY_Q5_K_M",
    "q5_0": "MOSTLY_Q5_0",
    "q5_k_s": "MOSTLY_Q5_K_S",
    "q5_1": "MOSTLY_Q5_1",
    "q4_k_m": "MOSTLY_Q4_K_M",
    "q4_k_s": "MOSTLY_Q4_K_S",
    "q4_1": "MOSTLY_Q4_1",
    "q4_0": "MOSTLY_Q4_0",
    "q3_k_m": "MOSTLY_Q3_K_M",
    "iq4_xs": "MOSTLY_IQ4_XS",
}


def check_quant_type(quant_type: str) -> str:
    """`quant_type` as a QUANT_TYPES name (any case), or ConfigError."""
    key = quant_type.lower()
    if key not in QUANT_TYPES:
        raise ConfigError(
            f"unknown quantization type '{quant_type}'", f"choose one of {', '.join(QUANT_TYPES)}"
        )
    return key


def check_runtime_quant(quant_type: str) -> str:
    """`quant_type` in the runtime's spelling ('keep' or a QUANT_TYPES name), or ConfigError."""
    key = quant_type.lower()
    if key != KEEP and key not in QUANT_TYPES:
        raise ConfigError(
            f"unknown quantization type '{quant_type}'",
            f"choose {KEEP} or one of {', '.join(QUANT_TYPES)}",
        )
    return key


def requantize(
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    quant_type: str,
    *,
    threads: int | None = None,
) -> Path:
    """Write `source` re-quantized to `quant_type` at `destination`; return the destination.

    Re-quantizing an already quantized base (the embedded one is Q4_1) goes through float and
    compounds the rounding error; llama.cpp allows it and so do we, but the quality of a
    Q4_1 -> Q8_0 copy is that of Q4_1, not of a Q8_0 made from the original weights.
    """
    key = check_quant_type(quant_type)
    read_base_info(source)  # refuses a missing or damaged model with one line
    out = Path(destination)
    if out.resolve() == Path(source).resolve():
        raise InputFileError("the output would overwrite the input", "choose another output path")
    ll = ensure_backend()
    params = ll.llama_model_quantize_default_params()
    params.ftype = getattr(ll, f"LLAMA_FTYPE_{QUANT_TYPES[key]}")
    params.allow_requantize = True
    params.nthread = threads or default_threads()
    with atomic_path(out) as tmp:
        take_recent_errors()
        rc = ll.llama_model_quantize(
            str(Path(source)).encode(), str(tmp).encode(), ctypes.byref(params)
        )
        if rc != 0:
            raise RuntimeBackendError(
                f"llama.cpp could not quantize {source} to {key}",
                take_recent_errors() or "check free disk space and the input model",
            )
    return out


def runtime_copy(
    base: str | os.PathLike[str],
    quant_type: str = DEFAULT_RUNTIME_QUANT,
    on_build: Callable[[str], None] | None = None,
) -> Path:
    """The file the runtime should load for `base`: itself, or a cached `quant_type` copy.

    The copy lives in $EDGEFED_HOME/cache/gguf/<base sha256>.<quant>.gguf and is made once.
    A base that already has that file type is used as is. Once the copy exists, finding it
    costs one hash of the base, not a parse of its metadata (~2 s on a 49k vocabulary).
    `on_build` is told before the copy is made (the first time: up to a minute).
    """
    if quant_type == KEEP:
        return Path(base)
    key = quant_type.lower()
    copy = cache_dir("gguf") / f"{sha256_file(require_file(base, 'base model'))}.{key}.gguf"
    if copy.is_file():
        return copy
    if read_base_info(base).file_type.lower() == key:
        return Path(base)
    if on_build is not None:
        on_build(f"building the runtime's {key} copy of the base (once; it is cached)")
    requantize(base, copy, key)
    return copy
