"""`edgefed device list` and `device set`: this machine's workspaces, and repairs to one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgefed.cli.options import JsonOption, TokenFileOption, WorkspaceOption, store_token
from edgefed.cli.output import emit_json, stdout, user_errors

app = typer.Typer(
    help="This machine's device workspaces: list them, point one at other data or another "
    "store path.",
    no_args_is_help=True,
)


@app.command("list")
@user_errors
def list_workspaces(as_json: JsonOption = False) -> None:
    """Every workspace this machine knows (under $EDGEFED_HOME, and those `join --workspace`
    made elsewhere), with its federation, device, next round, store and data. A command
    without --workspace uses $EDGEFED_WORKSPACE, else the only one listed here."""
    from edgefed.device.workspace import Workspace, known_workspaces
    from edgefed.errors import EdgefedError

    rows = []
    for root in known_workspaces():
        try:
            ws = Workspace.open(root)
            config = ws.config
            rows.append(
                {
                    "workspace": str(root),
                    "federation": config.federation,
                    "device": config.device,
                    "next_round": ws.next_round(),
                    "left": config.left is not None,  # a flag, as `status --json` has it
                    "store": config.store,
                    "data": config.data,
                }
            )
        except EdgefedError as exc:  # a damaged workspace is listed with what is wrong
            rows.append({"workspace": str(root), "problem": str(exc)})
    if as_json:
        emit_json(rows)
        return
    if not rows:
        stdout.print("no device workspace on this machine; join a federation with `edgefed join`")
        return
    # a block per workspace, not a table: six columns in 80 would cut every path to a stub
    for row in rows:
        if "problem" in row:
            stdout.print(f"{row['workspace']}: {row['problem']}", markup=False, soft_wrap=True)
            continue
        state = "left" if row["left"] else f"next round {row['next_round']}"
        stdout.print(f"{row['device']} in {row['federation']} ({state})", highlight=False)
        for label in ("workspace", "store", "data"):
            stdout.print(f"  {label:<9}  {row[label]}", markup=False, soft_wrap=True)


@app.command("set")
@user_errors
def set_device(
    data: Annotated[
        Path | None,
        typer.Option(
            help="This device's text from now on (checked like join's: at least 3 usable "
            "documents). Documents already split keep their split.",
            show_default=False,
        ),
    ] = None,
    store: Annotated[
        str | None,
        typer.Option(
            help="Where the federation's store is now (a folder moved, a relay's new URL); it "
            "must hold this federation with this device registered.",
            show_default=False,
        ),
    ] = None,
    workspace: WorkspaceOption = None,
    token_file: TokenFileOption = None,
) -> None:
    """Repair a workspace: point it at other data or at the store in another place. Nothing is
    changed unless everything checks."""
    from contextlib import nullcontext

    from edgefed.device.federation import set_device as set_workspace
    from edgefed.device.workspace import find_workspace
    from edgefed.errors import ConfigError
    from edgefed.sync.backends import open_store

    if data is None and store is None:
        raise ConfigError("nothing to set", "give --data PATH and/or --store STORE")
    ws = find_workspace(workspace)
    opener = (
        nullcontext(None) if store is None else open_store(store, token=store_token(token_file, ws))
    )
    with opener as opened:
        config = set_workspace(ws, data=data, store=opened)
    stdout.print(f"{config.device}: data {config.data}; store {config.store}", soft_wrap=True)
