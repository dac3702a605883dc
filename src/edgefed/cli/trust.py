"""`edgefed aggregate` and `edgefed trust show`: this device's trust row and its mixed adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edgefed.cli.federation import WorkspaceOption
from edgefed.cli.options import (
    ByTokensOption,
    ClipNormOption,
    JsonOption,
    MergeOption,
    RuntimeQuantOption,
    TemperatureOption,
    ThreadsOption,
    ThresholdOption,
    TopKOption,
    TrustOption,
)
from edgefed.cli.output import emit_json, stdout, user_errors
from edgefed.cli.progress import ProgressDisplay

app = typer.Typer(help="Trust rows: how much this device trusts each peer, round by round.")


@user_errors
def aggregate(
    round_number: Annotated[
        int, typer.Option("--round", "-r", help="The round to aggregate.", min=0)
    ],
    adapter: Annotated[
        Path,
        typer.Option(
            help="This device's own adapter for the round (an `edgefed train` run folder).",
            show_default=False,
        ),
    ],
    trust: TrustOption = None,
    temperature: TemperatureOption = None,
    top_k: TopKOption = None,
    threshold: ThresholdOption = None,
    merge: MergeOption = "factors",
    by_tokens: ByTokensOption = False,
    clip_norm: ClipNormOption = None,
    workspace: WorkspaceOption = None,
    runtime_quant: RuntimeQuantOption = "q8_0",
    threads: ThreadsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Compute this device's trust row over the round's verified peers and write the mix."""
    from edgefed.device.aggregate import aggregate_round
    from edgefed.device.workspace import find_workspace

    with ProgressDisplay() as display:
        display.status("computing the trust row")
        result = aggregate_round(
            find_workspace(workspace),
            round_number,
            adapter,
            scheme=trust,
            temperature=temperature,
            top_k=top_k,
            threshold=threshold,
            merge=merge,
            by_tokens=by_tokens,
            runtime_quant=runtime_quant,
            clip_norm=clip_norm,
            threads=threads,
            on_progress=display.progress,
        )
    if as_json:
        emit_json(result.as_dict())
        return
    table = Table(
        "device", "score", "weight", title=f"trust row ({result.row.scheme}), round {round_number}"
    )
    for device, score, weight in zip(
        result.row.devices, result.row.scores, result.row.weights, strict=True
    ):
        table.add_row(device, "-" if score is None else f"{score:.4f}", f"{weight:.3f}")
    stdout.print(table)
    stdout.print(
        f"mixed adapter: {result.adapter_dir} ({merge} merge, relative ΔW error "
        f"{result.relative_error:.2%})"
    )


@app.command("show")
@user_errors
def show(workspace: WorkspaceOption = None, as_json: JsonOption = False) -> None:
    """This device's trust rows over the rounds: one row per round, one column per device."""
    from edgefed.device.aggregate import trust_history
    from edgefed.device.workspace import find_workspace

    history = trust_history(find_workspace(workspace))
    if as_json:
        emit_json(history)
        return
    devices = sorted({d for row in history for d in row["devices"]})
    table = Table("round", "scheme", *devices, title="trust weights")
    for row in history:
        weights = dict(zip(row["devices"], row["weights"], strict=True))
        table.add_row(
            str(row["round"]),
            row["scheme"],
            *(f"{weights[d]:.3f}" if d in weights else "-" for d in devices),
        )
    stdout.print(table)
