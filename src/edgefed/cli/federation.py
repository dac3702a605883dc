"""`edgefed init`, `join`, `sync`, `status`: a device's side of a federation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edgefed.cli.options import (
    DEFAULT_TARGETS_TEXT,
    LORA_DEFAULTS,
    AlphaOption,
    BaseOption,
    DpClipOption,
    DpNoiseOption,
    DropoutOption,
    InitSeedOption,
    JsonOption,
    RankOption,
    StoreArgument,
    TargetsOption,
    TokenFileOption,
    WorkspaceOption,
    dp_noise,
    store_token,
)
from edgefed.cli.output import emit_json, stderr, stdout, user_errors
from edgefed.device.federation import (
    DEFAULT_MAX_STALENESS,
    DEFAULT_ROUND_STEPS,
    DEFAULT_WARMUP_STEPS,
)
from edgefed.trust.schemes import DEFAULT_SCHEME, schemes_help, temperatures_help


@user_errors
def init(
    store: StoreArgument,
    base: BaseOption = None,
    rank: RankOption = LORA_DEFAULTS.rank,
    alpha: AlphaOption = LORA_DEFAULTS.alpha,
    dropout: DropoutOption = LORA_DEFAULTS.dropout,
    targets: TargetsOption = DEFAULT_TARGETS_TEXT,
    init_seed: InitSeedOption = LORA_DEFAULTS.init_seed,
    warmup_steps: Annotated[
        int, typer.Option(help="Local steps before the first round.", min=0)
    ] = DEFAULT_WARMUP_STEPS,
    round_steps: Annotated[
        int, typer.Option(help="Local steps between aggregations.", min=1)
    ] = DEFAULT_ROUND_STEPS,
    max_staleness: Annotated[
        int,
        typer.Option(
            help="How many rounds old a peer's adapter may be and still be mixed: a device "
            "aggregating round r mixes each peer's freshest adapter of rounds r-N..r, so a "
            "device that is late or offline still counts (0: lock-step, only round r).",
            min=0,
        ),
    ] = DEFAULT_MAX_STALENESS,
    reference: Annotated[
        Path | None,
        typer.Option(help="Shared reference text for prediction trust.", show_default=False),
    ] = None,
    trust: Annotated[
        str,
        typer.Option(help=f"Default trust scheme of every device's round: {schemes_help()}."),
    ] = DEFAULT_SCHEME,
    temperature: Annotated[
        float | None,
        typer.Option(
            help="Default softmax temperature for --trust. Default: the scheme's measured one "
            f"({temperatures_help()}; see README).",
            show_default=False,
        ),
    ] = None,
    federation_id: Annotated[
        str | None, typer.Option("--id", help="Federation id. Default: a random one.")
    ] = None,
    token_file: TokenFileOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a federation in an empty store: base fingerprint, LoRA config, schedule."""
    from edgefed.adapter import LoraSpec
    from edgefed.device.federation import init_federation
    from edgefed.sync.backends import open_store
    from edgefed.trust.settings import TrustSettings

    lora = LoraSpec(
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        targets=LoraSpec.parse_targets(targets),
        init_seed=init_seed,
    )
    defaults = TrustSettings(scheme=trust, temperature=temperature)
    with open_store(store, token=store_token(token_file)) as opened:
        federation = init_federation(
            opened,
            base=base,
            lora=lora,
            warmup_steps=warmup_steps,
            round_steps=round_steps,
            max_staleness=max_staleness,
            trust=defaults,
            reference=reference,
            federation_id=federation_id,
        )
    if as_json:
        emit_json({k: v for k, v in federation.document.items() if k != "lora_modules"})
        return
    stdout.print(
        f"federation [bold]{federation.id}[/] created in {store}: base "
        f"{federation.base_name} ({federation.base_sha256[:12]}), LoRA rank {rank} on "
        f"{len(federation.lora_modules)} modules. Devices join with: "
        f"edgefed join {store} --device NAME --data PATH"
    )


@user_errors
def join(
    store: StoreArgument,
    device: Annotated[
        str, typer.Option("--device", "-d", help="This device's name in the federation.")
    ],
    data: Annotated[Path, typer.Option(help="This device's own text (never leaves it).")],
    workspace: WorkspaceOption = None,
    base: BaseOption = None,
    token_file: TokenFileOption = None,
    as_json: JsonOption = False,
) -> None:
    """Join a federation: make this device's workspace and key, register the public key."""
    from edgefed.device.federation import join_federation
    from edgefed.sync.backends import open_store

    with open_store(store, token=store_token(token_file)) as opened:
        joined = join_federation(opened, device, data=data, workspace=workspace, base=base)
    if as_json:
        config = joined.config
        emit_json({"workspace": str(joined.root), "format": config.FORMAT} | config.as_dict())
        return
    stdout.print(f"joined as [bold]{device}[/]; workspace {joined.root}")


@user_errors
def sync(
    round_number: Annotated[int, typer.Option("--round", "-r", help="The round to sync.", min=0)],
    adapter: Annotated[
        Path | None,
        typer.Option(
            help="Publish this adapter (an `edgefed train` run folder or a PEFT folder) for the "
            "round first.",
            show_default=False,
        ),
    ] = None,
    compress: Annotated[
        bool,
        typer.Option(
            help="Send int8 codes with per-row scales instead of float16: half the bytes, "
            "lossy (see README)."
        ),
    ] = False,
    dp_clip: DpClipOption = None,
    dp_noise_multiplier: DpNoiseOption = 0.0,
    min_peers: Annotated[
        int, typer.Option(help="Wait until this many peers' adapters are verified.", min=0)
    ] = 0,
    wait: Annotated[
        float, typer.Option(help="Wait at most this many seconds for --min-peers.", min=0)
    ] = 0.0,
    workspace: WorkspaceOption = None,
    token_file: TokenFileOption = None,
    as_json: JsonOption = False,
) -> None:
    """Publish this device's adapter for a round and pull its peers' verified adapters."""
    from edgefed.device.publish import publish_adapter
    from edgefed.device.pull import pull_round
    from edgefed.device.workspace import find_workspace
    from edgefed.sync.backends import open_store

    ws = find_workspace(workspace)
    dp = dp_noise(dp_clip, dp_noise_multiplier)
    if dp is not None:
        stderr.print(dp.describe())
    with open_store(ws.config.store, token=store_token(token_file)) as opened:
        published = adapter is not None and publish_adapter(
            opened, ws, round_number, adapter, compress=compress, dp=dp
        )
        report = pull_round(
            opened,
            ws,
            round_number,
            min_peers=min_peers,
            wait_seconds=wait,
            on_wait=lambda n, s: stderr.print(
                f"waiting for peers: {n}/{min_peers} after {s:.0f} s"
            ),
        )
    if as_json:
        emit_json({"round": round_number, "published": published} | report.as_dict())
        return
    if min_peers and len(report.fresh()) < min_peers:
        stderr.print(
            f"warning: only {len(report.fresh())} of {min_peers} peers published round "
            f"{round_number} within {wait:g} s"
        )
    stdout.print(
        f"round {round_number}: {'published' if published else 'nothing new published'}; "
        f"{len(report.verified)} peer adapter(s) verified: {', '.join(report.verified) or 'none'}"
    )
    for rejection in report.rejected:
        stdout.print(f"  rejected {rejection['device']}: {rejection['reason']}")


@user_errors
def status(
    workspace: WorkspaceOption = None,
    token_file: TokenFileOption = None,
    as_json: JsonOption = False,
) -> None:
    """The federation, the current round, every device's latest round, rejections, metrics."""
    from edgefed.device.federation import federation_status
    from edgefed.device.workspace import find_workspace
    from edgefed.sync.backends import open_store

    ws = find_workspace(workspace)
    with open_store(ws.config.store, token=store_token(token_file)) as opened:
        report = federation_status(opened, ws)
    if as_json:
        emit_json(report)
        return
    stdout.print(
        f"federation {report['federation']} in {report['store']}; this device: {report['device']}; "
        f"current round {report['current_round']}"
    )
    table = Table("device", "latest round", title_justify="left")
    for name, info in report["devices"].items():
        latest = info["latest_round"]
        table.add_row(name, "-" if latest is None else str(latest))
    stdout.print(table)
    for rejection in report["rejected"]:
        stdout.print(
            f"rejected {rejection['device']} round {rejection['round']}: {rejection['reason']}"
        )
    if report["last_metrics"]:
        stdout.print(f"last metrics: {report['last_metrics']}")
