"""Option help texts and shared option types: each option is described once, here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

BaseOption = Annotated[
    Path | None,
    typer.Option(
        "--base",
        help="GGUF base model. Default: the embedded SmolLM2-135M-Instruct (Q4_1).",
        show_default=False,
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Write one JSON document to stdout instead of a table.")
]
ThreadsOption = Annotated[
    int | None,
    typer.Option(
        "--threads", help="CPU threads (llama.cpp and PyTorch). Default: all cores.", min=1
    ),
]
WindowOption = Annotated[
    int,
    typer.Option("--window", help="Tokens per evaluation window (the context size).", min=2),
]
StrideOption = Annotated[
    int | None,
    typer.Option(
        "--stride",
        help="New tokens scored per window after the first; each keeps window-stride tokens "
        "of context. Default: window/2.",
        min=1,
    ),
]
RuntimeQuantOption = Annotated[
    str,
    typer.Option(
        "--runtime-quant",
        help="Quant type llama.cpp evaluates with: a cached copy of the base is made once "
        "(q8_0 measured fastest at equal perplexity on the embedded base), or 'keep' to use "
        "the base file as it is.",
    ),
]
