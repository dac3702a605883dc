"""`edgefed evaluate`: perplexity of the base and each adapter on a text, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edgefed.cli.builders import BaseOptions
from edgefed.cli.options import (
    BaseOption,
    JsonOption,
    RuntimeQuantOption,
    StrideOption,
    ThreadsOption,
    WindowOption,
    WorkspaceOption,
)
from edgefed.cli.output import (
    emit_json,
    render_evaluation,
    stdout,
    user_errors,
    warn_skipped,
)
from edgefed.cli.progress import ProgressDisplay
from edgefed.runtime.llama import DEFAULT_WINDOW
from edgefed.runtime.quantize import DEFAULT_RUNTIME_QUANT


@user_errors
def evaluate(
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="Text file or folder (searched recursively) of .txt/.md files (a document each), "
            ".jsonl (a document per line's `text` field) and .csv files (a document per row's "
            "`text` column). Default: a sample of the embedded BBC News text.",
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
    window: WindowOption = DEFAULT_WINDOW,
    stride: StrideOption = None,
    threads: ThreadsOption = None,
    runtime_quant: RuntimeQuantOption = DEFAULT_RUNTIME_QUANT,
    round_number: Annotated[
        int | None,
        typer.Option(
            "--round",
            "-r",
            help="Evaluate this device's round instead: base, local and aggregated adapters on "
            "its test split, and its trust row.",
            min=0,
            show_default=False,
        ),
    ] = None,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Perplexity of the base and adapters on a text, or of a device's round on its test split.

    With --data/--adapter: any text and GGUF adapters. With --round (and --workspace): the
    device's own base, local and aggregated adapters on its test split, never the
    trust-validation split that chose the weights.
    """
    if round_number is not None or workspace is not None:
        if data is not None or adapter:
            from edgefed.errors import ConfigError

            raise ConfigError(
                "--round evaluates a device's own round; --data/--adapter evaluate any text",
                "give one or the other",
            )
        _evaluate_round(
            round_number,
            workspace,
            BaseOptions(runtime_quant=runtime_quant, threads=threads),
            as_json,
        )
        return
    from edgefed.demo_text import demo_evaluation_text
    from edgefed.documents import read_documents
    from edgefed.evaluation import evaluate_text

    if data is None:
        text, source = demo_evaluation_text(), "embedded BBC News sample"
    else:
        documents = read_documents(data)
        warn_skipped(documents.skipped)
        text, source = documents.joined(), str(data)
    with ProgressDisplay() as display:
        display.status("loading the base in llama.cpp")
        rows = evaluate_text(
            text,
            base=base,
            adapters=adapter or [],
            window=window,
            stride=stride,
            threads=threads,
            runtime_quant=runtime_quant,
            on_progress=display.progress,
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


def _evaluate_round(
    round_number: int | None,
    workspace: Path | None,
    base: BaseOptions,
    as_json: bool,
) -> None:
    """A round's recorded evaluation, computed (and recorded) first if the round lacks one."""
    from edgefed.device.evaluate import evaluate_round
    from edgefed.device.workspace import find_workspace

    ws = find_workspace(workspace)
    if round_number is None:
        round_number = ws.last_aggregated_round()
    evaluation = ws.read_evaluation(round_number)
    if evaluation is None:
        with (
            base.load(ws.config.base) as loaded,
            ProgressDisplay() as display,
        ):
            display.status(f"evaluating round {round_number} on the test split")
            evaluation = evaluate_round(ws, round_number, loaded, on_progress=display.progress)
    if as_json:
        emit_json(evaluation.as_dict())
        return
    render_evaluation(evaluation)
