"""`edgefed aggregate` and `edgefed trust show`: this device's trust row and its mixed adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edgefed.cli.builders import BaseOptions, trust_settings
from edgefed.cli.options import (
    ByTokensOption,
    ClipNormOption,
    JsonOption,
    MergeOption,
    RuntimeQuantOption,
    SeTemperatureOption,
    TemperatureOption,
    ThreadsOption,
    ThresholdOption,
    TopKOption,
    TrustOption,
    WorkspaceOption,
)
from edgefed.cli.output import emit_json, stdout, user_errors
from edgefed.cli.progress import ProgressDisplay
from edgefed.runtime.quantize import DEFAULT_RUNTIME_QUANT
from edgefed.trust.settings import DEFAULT_MERGE

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
    se_temperature: SeTemperatureOption = None,
    top_k: TopKOption = None,
    threshold: ThresholdOption = None,
    merge: MergeOption = DEFAULT_MERGE,
    by_tokens: ByTokensOption = False,
    clip_norm: ClipNormOption = None,
    workspace: WorkspaceOption = None,
    runtime_quant: RuntimeQuantOption = DEFAULT_RUNTIME_QUANT,
    threads: ThreadsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Compute this device's trust row over the round's verified peers and write the mix."""
    from edgefed.device.aggregate import aggregate_round, device_trust_settings
    from edgefed.device.workspace import find_workspace

    settings = trust_settings(
        trust=trust,
        temperature=temperature,
        se_temperature=se_temperature,
        top_k=top_k,
        threshold=threshold,
        merge=merge,
        by_tokens=by_tokens,
        clip_norm=clip_norm,
    )
    ws = find_workspace(workspace)
    device_trust_settings(ws, settings)  # before the base is loaded
    with (
        BaseOptions(runtime_quant=runtime_quant, threads=threads).load(ws.config.base) as loaded,
        ProgressDisplay() as display,
    ):
        display.status("computing the trust row")
        result = aggregate_round(
            ws, round_number, adapter, loaded, settings, on_progress=display.progress
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
        score_text = "-" if score is None else f"{score:.4f}"
        table.add_row(_name(device, ws.device), score_text, f"{weight:.3f}")
    stdout.print(table)
    stdout.print(
        f"mixed adapter: {result.adapter_dir} ({settings.merge} merge, relative ΔW error "
        f"{result.relative_error:.2%})"
    )


@app.command("show")
@user_errors
def show(workspace: WorkspaceOption = None, as_json: JsonOption = False) -> None:
    """This device's trust rows over the rounds: one row per round, one column per device."""
    from edgefed.device.aggregate import trust_history
    from edgefed.device.workspace import find_workspace

    ws = find_workspace(workspace)
    history = trust_history(ws)
    if as_json:
        emit_json([record.as_dict() for record in history])
        return
    if not history:
        stdout.print(f"{ws.device} has no trust rows yet: `edgefed round` makes one a round")
        return
    devices = sorted({d for record in history for d in record.devices})
    late = any(r.adapter_round(d) != r.round for r in history for d in r.devices)
    table = Table(
        "round",
        "scheme",
        *(_name(d, ws.device) for d in devices),
        title="trust weights",
        caption="(rN): that peer's adapter was from round N, mixed while it was late"
        if late
        else None,
    )
    for record in history:
        weights = record.weights_by_device()
        table.add_row(
            str(record.round),
            record.scheme,
            *(_weight(record, d, weights) for d in devices),
        )
    stdout.print(table)


def _weight(record, device: str, weights: dict[str, float]) -> str:
    if device not in weights:
        return "-"
    adapter_round = record.adapter_round(device)
    return f"{weights[device]:.3f}" + (f" (r{adapter_round})" * (adapter_round != record.round))


def _name(device: str, me: str) -> str:
    """A device's name in a trust table, this device's own marked: its weight is how much of
    its own adapter the device keeps, not trust in a peer."""
    return f"{device} (self)" if device == me else device
