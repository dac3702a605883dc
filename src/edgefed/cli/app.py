"""The `edgefed` command: wires the command modules together, nothing else."""

from __future__ import annotations

from typing import Annotated

import typer

from edgefed import __version__
from edgefed.cli import (
    base,
    device,
    evaluate,
    export,
    federation,
    generate,
    prune,
    quant,
    relay,
    round,
    simulate,
    train,
    trust,
)
from edgefed.cli.output import configure_logging

app = typer.Typer(
    name="edgefed",
    help="Fine-tune one small LLM across devices that never share their data: each trains a "
    "QLoRA adapter, shares only the adapter, and mixes its peers' adapters by trust.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals can hold tokens and keys
    add_completion=False,
    rich_markup_mode="markdown",  # reflows docstring paragraphs to the terminal's width
)
app.add_typer(base.app, name="base")
app.add_typer(quant.app, name="quant")
app.add_typer(relay.app, name="relay")
app.add_typer(trust.app, name="trust")
app.add_typer(device.app, name="device")
app.command("init")(federation.init)
app.command("join")(federation.join)
app.command("train")(train.train)
app.command("sync")(federation.sync)
app.command("aggregate")(trust.aggregate)
app.command("round")(round.round_command)
app.command("run")(round.run_command)
app.command("simulate")(simulate.simulate)
app.command("status")(federation.status)
app.command("leave")(federation.leave)
app.command("repair")(federation.repair)
app.command("evaluate")(evaluate.evaluate)
app.command("prune")(prune.prune)
app.command("generate")(generate.generate)
app.command("chat")(generate.chat)
app.command("export")(export.export)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"edgefed {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log details to stderr.")
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    configure_logging(verbose)


def main() -> None:
    app()
