"""`edgefed export`: a device's model as a merged GGUF, a base + adapter pair for llama.cpp and
Ollama, or a PEFT folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgefed.cli.options import (
    AdapterChoiceOption,
    BaseOption,
    JsonOption,
    ModelRoundOption,
    ThreadsOption,
    WorkspaceOption,
)
from edgefed.cli.output import emit_json, stderr, stdout, user_errors
from edgefed.runtime.quantize import QUANT_TYPES
from edgefed.use.export import DEFAULT_MERGED_TYPE, FORMATS, MERGED


@user_errors
def export(
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Where to write: a .gguf file (merged), or a folder (lora, peft).",
            show_default=False,
        ),
    ],
    export_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="merged: one GGUF with the adapter added into the base's weights (llama.cpp, "
            "Ollama, LM Studio, llama-server); lora: a folder with the base, the GGUF adapter, an "
            "Ollama Modelfile and the llama.cpp commands; peft: the PEFT adapter folder for "
            f"transformers. One of {', '.join(FORMATS)}.",
        ),
    ] = MERGED,
    quant_type: Annotated[
        str | None,
        typer.Option(
            "--type",
            help=f"Type of the merged GGUF: one of {', '.join(QUANT_TYPES)}. Default: "
            f"{DEFAULT_MERGED_TYPE}, which scored as base + adapter on the embedded base "
            "where its own Q4_1 kept 5% of the adapter's gain (re-rounded onto the same grid "
            "the weights fall back to their old values); `--format lora` keeps a 4-bit base "
            "and all of the adapter.",
            show_default=False,
        ),
    ] = None,
    adapter: AdapterChoiceOption = None,
    round_number: ModelRoundOption = None,
    workspace: WorkspaceOption = None,
    base: BaseOption = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    threads: ThreadsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Export a device's model (by default its latest personalised adapter) for the tools
    people run models with; written atomically, never over an existing output unless --force.
    """
    from edgefed.use import choose_model, export_model

    model = choose_model(adapter, round_number=round_number, workspace=workspace, base=base)
    with stderr.status(f"exporting {model.label}") as status:

        def progress(done: int, total: int) -> None:
            status.update(f"merging {model.label} into the base: tensor {done}/{total}")
            if done == total and (quant_type or DEFAULT_MERGED_TYPE).lower() != "f32":
                status.update(f"quantizing to {quant_type or DEFAULT_MERGED_TYPE} with llama.cpp")

        result = export_model(
            model, output, format=export_format, quant_type=quant_type, force=force,
            threads=threads, on_progress=progress,
        )  # fmt: skip
    if as_json:
        emit_json({**model.as_dict(), **result.as_dict()})
        return
    size = sum(
        p.stat().st_size
        for p in ([result.path] if result.path.is_file() else result.path.iterdir())
    )
    kind = f"{result.format}, {result.quant_type}" if result.quant_type else result.format
    stdout.print(
        f"wrote {result.path} ({kind}, {size / 2**20:.1f} MiB) from {model.label}", highlight=False
    )
    if result.format == "lora":
        stdout.print(f"run it as {result.path}/README.md says (llama-cli, llama-server, ollama)")
