"""`edgefed init`, `join`, `sync`, `status`: a device's side of a federation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edgefed.cli.options import BaseOption, DpClipOption, DpNoiseOption, JsonOption, dp_noise
from edgefed.cli.output import emit_json, stderr, stdout, user_errors
from edgefed.trust.schemes import DEFAULT_SCHEME, SCHEMES

StoreArgument = Annotated[
    str,
    typer.Argument(
        help="The federation store: a folder kept in step by a sync tool (Syncthing, Dropbox, "
        "NFS, a USB stick), an http(s):// relay URL, or s3://BUCKET/PREFIX (add "
        "?endpoint=http://HOST:PORT for MinIO, Ceph and other S3-compatible stores).",
        show_default=False,
    ),
]
WorkspaceOption = Annotated[
    Path | None,
    typer.Option(
        "--workspace",
        "-w",
        help="Device workspace. Default: the only one under $EDGEFED_HOME.",
        show_default=False,
    ),
]
TokenFileOption = Annotated[
    Path | None,
    typer.Option(
        "--token-file",
        help="File holding the relay's bearer token (or set EDGEFED_TOKEN).",
        show_default=False,
    ),
]


def store_token(token_file: Path | None) -> str | None:
    from edgefed.errors import InputFileError

    if token_file is None:
        return os.environ.get("EDGEFED_TOKEN") or None
    try:
        return token_file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise InputFileError(
            f"cannot read token file {token_file} ({exc})", "check the path"
        ) from None


@user_errors
def init(
    store: StoreArgument,
    base: BaseOption = None,
    rank: Annotated[int, typer.Option(help="LoRA rank of every device's adapter.", min=1)] = 8,
    alpha: Annotated[float, typer.Option(help="LoRA alpha.")] = 16.0,
    dropout: Annotated[float, typer.Option(help="LoRA dropout while training.")] = 0.05,
    targets: Annotated[
        str, typer.Option(help="Comma-separated modules to adapt.")
    ] = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    init_seed: Annotated[
        int, typer.Option(help="Shared seed of the initial adapter (same on every device).")
    ] = 0,
    warmup_steps: Annotated[
        int, typer.Option(help="Local steps before the first round.", min=0)
    ] = 100,
    round_steps: Annotated[int, typer.Option(help="Local steps between aggregations.", min=1)] = 25,
    reference: Annotated[
        Path | None,
        typer.Option(help="Shared reference text for prediction trust.", show_default=False),
    ] = None,
    trust: Annotated[
        str,
        typer.Option(help="Default trust scheme of every device's round (see README)."),
    ] = DEFAULT_SCHEME,
    temperature: Annotated[
        float | None,
        typer.Option(
            help="Default softmax temperature for --trust. Default: the scheme's measured one "
            "(perplexity 0.01 nats, prediction 0.1, weights 1; see README).",
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
    from edgefed.errors import DataError
    from edgefed.sync.store import open_store

    try:
        lora = LoraSpec(
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            targets=tuple(t.strip() for t in targets.split(",") if t.strip()),
            init_seed=init_seed,
        )
    except ValueError as exc:
        raise DataError(str(exc), "see edgefed init --help") from None
    if trust not in SCHEMES or (temperature is not None and temperature <= 0):
        raise DataError(
            f"--trust must be one of {', '.join(SCHEMES)} and --temperature positive",
            "see edgefed init --help",
        )
    with open_store(store, token=store_token(token_file)) as opened:
        manifest = init_federation(
            opened,
            base=base,
            lora=lora,
            warmup_steps=warmup_steps,
            round_steps=round_steps,
            trust={"scheme": trust}
            | ({"temperature": temperature} if temperature is not None else {}),
            reference=reference,
            federation_id=federation_id,
        )
    if as_json:
        emit_json({k: v for k, v in manifest.items() if k != "lora_modules"})
        return
    stdout.print(
        f"federation [bold]{manifest['id']}[/] created in {store}: base "
        f"{manifest['base']['name']} ({manifest['base']['sha256'][:12]}), LoRA rank {rank} on "
        f"{len(manifest['lora_modules'])} modules. Devices join with: "
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
    from edgefed.sync.store import open_store

    with open_store(store, token=store_token(token_file)) as opened:
        joined = join_federation(opened, device, data=data, workspace=workspace, base=base)
    if as_json:
        emit_json({"workspace": str(joined.root)} | joined.config)
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
    from edgefed.device.federation import publish_metrics, sync_round
    from edgefed.device.workspace import find_workspace
    from edgefed.sync.store import open_store

    ws = find_workspace(workspace)
    dp = dp_noise(dp_clip, dp_noise_multiplier)
    if dp is not None:
        stderr.print(dp.describe())
    tokens, metrics = publish_metrics(adapter) if adapter is not None else (0, {})
    with open_store(ws.config["store"], token=store_token(token_file)) as opened:
        report = sync_round(
            opened,
            ws,
            round_number,
            adapter=adapter,
            train_tokens=tokens,
            metrics=metrics,
            compress=compress,
            dp=dp,
            min_peers=min_peers,
            wait_seconds=wait,
            on_wait=lambda n, s: stderr.print(
                f"waiting for peers: {n}/{min_peers} after {s:.0f} s"
            ),
        )
    if as_json:
        emit_json(report.as_dict())
        return
    if min_peers and len(report.verified) < min_peers:
        stderr.print(f"warning: only {len(report.verified)} of {min_peers} peers after {wait:g} s")
    stdout.print(
        f"round {round_number}: {'published' if report.published else 'nothing new published'}; "
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
    from edgefed.sync.store import open_store

    ws = find_workspace(workspace)
    with open_store(ws.config["store"], token=store_token(token_file)) as opened:
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
