"""`edgefed prune`: free this device's disk of old rounds' adapters, keeping their records."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from edgefed.cli.options import JsonOption, WorkspaceOption
from edgefed.cli.output import emit_json, print_whole, stdout, user_errors
from edgefed.device.prune import DEFAULT_KEEP
from edgefed.plural import counted


@user_errors
def prune(
    keep: Annotated[
        int,
        typer.Option(
            help="Finished rounds to keep whole, the newest (1 or more): the next round starts "
            "from the newest one."
        ),
    ] = DEFAULT_KEEP,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be deleted; delete nothing.")
    ] = False,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Delete older rounds' adapters, optimizer states and pulled peer adapters from this
    device's workspace, keeping every round's records (round, trust, evaluation, metrics,
    split).

    Never touches an unfinished round, nor what a round still to run needs: the previous
    round's mix and optimizer state, and the peers' adapters it may still mix.
    """
    from edgefed.device.prune import prune_workspace
    from edgefed.device.workspace import find_workspace

    report = prune_workspace(find_workspace(workspace), keep, dry_run=dry_run)
    if as_json:
        emit_json(report.as_dict())
        return
    kept = f"kept {_rounds(report.kept)} whole" if report.kept else "no finished round yet"
    if not report.pruned:
        stdout.print(f"nothing to prune: {kept}")
        return
    verb = "would free" if report.dry_run else "freed"
    table = Table("round", "to delete" if report.dry_run else "deleted", "size")
    for pruned in report.pruned:
        table.add_row(str(pruned.round), _describe(pruned.paths), human_bytes(pruned.bytes))
    print_whole(table)
    stdout.print(
        f"{verb} {human_bytes(report.bytes)}; {kept}"
        + (
            f"; kept {counted(len(report.needed), 'older file')} the next rounds need"
            if report.needed
            else ""
        )
        + ("; dry run: nothing deleted" if report.dry_run else "")
    )


def human_bytes(size: int) -> str:
    """1536 → '1.5 KiB'."""
    value, unit, larger = float(size), "B", ["KiB", "MiB", "GiB", "TiB"]
    while value >= 1024 and larger:
        value, unit = value / 1024, larger.pop(0)
    return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"


def _describe(paths: list[str]) -> str:
    """A round's deleted paths in one line: its own files by name, the peers' by number (a
    federation of hundreds would fill the screen); --json lists every one."""
    peers = [p for p in paths if "/peers/" in p and p.endswith(".safetensors")]
    own = [p.split("/", 2)[-1] for p in paths if p not in peers]  # without "rounds/<r>/"
    return ", ".join(own + ([counted(len(peers), "peer adapter")] if peers else []))


def _rounds(numbers: list[int]) -> str:
    """[3, 4, 5] → 'rounds 3-5'; [7] → 'round 7'."""
    if len(numbers) == 1:
        return f"round {numbers[0]}"
    if numbers == list(range(numbers[0], numbers[-1] + 1)):
        return f"rounds {numbers[0]}-{numbers[-1]}"
    return "rounds " + ", ".join(map(str, numbers))
