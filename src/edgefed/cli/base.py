"""`edgefed base show`: what a GGUF base is, and the fingerprint federations compare."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edgefed.cli.options import JsonOption
from edgefed.cli.output import emit_json, print_whole, user_errors
from edgefed.errors import UnsupportedModelError
from edgefed.quant.gguf_file import read_base_info, resolve_base

app = typer.Typer(help="Inspect base models.", no_args_is_help=True)


@app.command("show")
@user_errors
def show(
    path: Annotated[
        Path | None,
        typer.Argument(
            help="GGUF file. Default: $EDGEFED_BASE, else the embedded SmolLM2-135M-Instruct.",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Print architecture, parameters, tensor types, tokenizer, context and sha256 fingerprint."""
    info = read_base_info(resolve_base(path))
    summary = info.summary() | {"supported": _trainable(info)}
    if as_json:
        emit_json(summary)
        return
    table = Table(title=f"base model {info.path.name}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")  # a narrow terminal folds a value; never cuts it short
    rows = [
        ("path", str(info.path)),
        ("architecture", info.architecture + ("" if summary["supported"] else "  (not supported)")),
        ("name", info.name),
        ("parameters", f"{info.n_params:,}"),
        ("layers / embedding", f"{info.n_layers} / {info.n_embd}"),
        ("heads / kv heads", f"{info.n_head} / {info.n_head_kv}"),
        ("context length", f"{info.context_length:,}"),
        ("file type", info.file_type),
        ("tensor types", ", ".join(f"{k} x{v}" for k, v in info.tensor_types.items())),
        (
            "tokenizer",
            f"{info.tokenizer_model} (pre: {info.tokenizer_pre}), {info.vocab_size:,} tokens",
        ),
        ("size", f"{info.size_bytes / 2**20:.1f} MiB"),
        ("fingerprint", f"sha256:{info.fingerprint}"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    print_whole(table)


def _trainable(info) -> bool:
    """Whether edgefed trains this base: a family it has a record of, with a RoPE its training
    copies compute (scoring needs neither)."""
    from edgefed.quant.training_copy import check_trainable

    try:
        check_trainable(info)
    except UnsupportedModelError:
        return False
    return True
