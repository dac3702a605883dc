"""The `edgefed` command line: thin Typer commands that parse, call the library and render."""

from edgefed.cli.app import app, main

__all__ = ["app", "main"]
