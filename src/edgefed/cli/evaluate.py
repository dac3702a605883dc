"""`edgefed evaluate`: perplexity of the base and each adapter on a text, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edgefed.cli.options import (
    BaseOption,
    JsonOption,
    RuntimeQuantOption,
    StrideOption,
    ThreadsOption,
    WindowOption,
)
from edgefed.cli.output import emit_json, stderr, stdout, user_errors


@user_errors
def evaluate(
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="Text file or folder of .txt/.md files. "
            "Default: a sample of the embedded BBC News text.",
            show_default=False,
        ),
    ] = None,
    adapter: Annotated[
        list[Path] | None,
        typer.Option(
            "--adapter", "-a", help="GGUF LoRA adapter; repeat for several.", show_default=False
        ),
    ] = None,
    base: BaseOption = None,
    window: WindowOption = 512,
    stride: StrideOption = None,
    threads: ThreadsOption = None,
    runtime_quant: RuntimeQuantOption = "q8_0",
    as_json: JsonOption = False,
) -> None:
    """Perplexity, tokens scored and tokens/s for the base and each adapter (llama.cpp)."""
    from edgefed.demo_text import demo_evaluation_text
    from edgefed.documents import read_documents
    from edgefed.evaluation import evaluate_text

    if data is None:
        text, source = demo_evaluation_text(), "embedded BBC News sample"
    else:
        documents = read_documents(data)
        if documents.skipped:
            stderr.print(f"warning: skipped {documents.skipped} file(s) that are not UTF-8 text")
        text, source = documents.joined(), str(data)
    with stderr.status("evaluating ...") as status:
        rows = evaluate_text(
            text,
            base=base,
            adapters=adapter or [],
            window=window,
            stride=stride,
            threads=threads,
            runtime_quant=runtime_quant,
            on_progress=lambda name: status.update(f"evaluating {name} ..."),
        )
    if as_json:
        emit_json({"data": source, "results": [row.as_dict() for row in rows]})
        return
    table = Table(title=f"perplexity on {source}", title_justify="left")
    for column in ("model", "perplexity", "tokens scored", "tokens/s"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in rows:
        table.add_row(
            row.model,
            f"{row.perplexity:.3f}",
            f"{row.tokens_scored:,}",
            f"{row.tokens_per_second:,.0f}",
        )
    stdout.print(table)
