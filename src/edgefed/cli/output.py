"""How every command talks to the terminal: one-line errors, JSON documents, rich tables.

Data goes to stdout (a table, or exactly one JSON document with --json); progress, warnings
and errors go to stderr, so `edgefed ... --json | jq` always works.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from edgefed.errors import EdgefedError

stdout = Console()
stderr = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])
EXIT_USER_ERROR = 2


def user_errors(command: F) -> F:
    """Turn an EdgefedError into one line on stderr and exit code 2; let bugs show tracebacks."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except EdgefedError as exc:
            stderr.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_USER_ERROR) from None

    return wrapper  # type: ignore[return-value]


def warn_skipped(skipped: tuple[str, ...]) -> None:
    """One warning line naming the data files that were not read (not UTF-8 text), if any."""
    from edgefed.documents import skipped_files

    if skipped:
        stderr.print(f"warning: {skipped_files(skipped)}", highlight=False, soft_wrap=True)


def print_whole(renderable: Any) -> None:
    """Print to stdout; to a pipe or a file at the renderable's own width, not rich's 80
    columns, so that no value (a path, a fingerprint to compare) is cut or wrapped there."""
    if stdout.is_terminal:
        stdout.print(renderable)
    else:
        Console(file=sys.stdout, width=1 << 20).print(renderable)


def emit_json(document: Any) -> None:
    """Write exactly one JSON document to stdout."""
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")
    sys.stdout.flush()


class _LogLines(logging.Formatter):
    """`warning: ...`, as every line a command prints itself; --verbose adds which module
    logged it."""

    def __init__(self, verbose: bool) -> None:
        super().__init__("%(name)s: %(message)s" if verbose else "%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {super().format(record)}"


def configure_logging(verbose: bool) -> None:
    """Library logs to stderr: warnings by default, everything with --verbose."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogLines(verbose))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, handlers=[handler])
    if not verbose:  # chatty third-party loggers and deprecation notes a user cannot act on
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        for name in ("transformers", "bitsandbytes", "gguf", "httpx"):
            logging.getLogger(name).setLevel(logging.ERROR)


def render_evaluation(evaluation) -> None:
    """A round's test-split table and trust row (an EvaluationRecord): what `round` ends with
    and `evaluate --round` shows."""
    base = evaluation.models["base"]["perplexity"]
    table = Table(
        title=f"round {evaluation.round}, {evaluation.device}: perplexity on the test "
        f"split ({evaluation.tokens_scored:,} tokens)",
        title_justify="left",
    )
    for column in ("model", "perplexity", "vs base"):
        table.add_column(column, justify="left" if column == "model" else "right")
    labels = {
        "base": "base",
        "local": "local (own training, before mixing)",
        "aggregated": "aggregated (trust-weighted mix)",
    }
    for name, label in labels.items():
        value = evaluation.models[name]["perplexity"]
        table.add_row(label, f"{value:.3f}", f"{value / base - 1:+.1%}")
    stdout.print(table)
    trust = evaluation.trust
    row = Table(
        "device", "weight", "adapter of round", title=f"trust row ({trust['scheme']})",
        title_justify="left",
    )  # fmt: skip
    # an evaluation from before the rounds were recorded mixed only the round's own adapters
    rounds = trust.get("adapter_rounds") or [evaluation.round] * len(trust["devices"])
    for device, weight, adapter_round in zip(
        trust["devices"], trust["weights"], rounds, strict=True
    ):
        name = device + (" (self)" if device == evaluation.device else "")
        row.add_row(name, f"{weight:.3f}", str(adapter_round))
    stdout.print(row)
