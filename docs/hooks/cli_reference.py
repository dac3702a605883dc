"""MkDocs hook: the command reference is generated at build time from the Typer app by
Typer's own documentation generator (what `typer edgefed.cli.app utils docs` prints), so the
page can never drift from `--help`."""

from __future__ import annotations

import typer
from typer.cli import get_docs_for_click

MARKER = "<!-- the commands, generated -->"


def on_page_markdown(markdown: str, **kwargs) -> str:
    if MARKER not in markdown:
        return markdown
    from edgefed.cli.app import app

    command = typer.main.get_command(app)
    with typer.Context(command) as context:
        generated = get_docs_for_click(obj=command, ctx=context, name="edgefed", indent=1)
    return markdown.replace(MARKER, generated)
