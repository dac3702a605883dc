"""`edgefed init`, `join`, `sync`, `status`: a device's side of a federation."""

from __future__ import annotations

import sys
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
    MinPeersOption,
    RankOption,
    StoreArgument,
    TargetsOption,
    TokenFileOption,
    WaitOption,
    WorkspaceOption,
    dp_noise,
    store_token,
)
from edgefed.cli.output import emit_json, stderr, stdout, user_errors, warn_skipped
from edgefed.cli.progress import EXIT_INTERRUPTED, ProgressDisplay, stop_on_signals
from edgefed.cli.round_report import describe_wait, went_on_without
from edgefed.device.federation import (
    DEFAULT_MAX_STALENESS,
    DEFAULT_MAX_STEPS,
    DEFAULT_ROUND_EPOCHS,
    DEFAULT_WAIT_SECONDS,
    DEFAULT_WARMUP_EPOCHS,
)
from edgefed.errors import ConfigError
from edgefed.plural import counted
from edgefed.trust.schemes import (
    DEFAULT_SCHEME,
    schemes_help,
    temperatures_help,
    trust_scheme,
)

_SCHEDULE = "Schedule"
# the steps of every round after the warm-up when only --warmup-steps is given (the schedule in
# steps that federations had before epochs)
ROUND_STEPS_WITH_WARMUP = 25


@user_errors
def init(
    store: StoreArgument,
    base: BaseOption = None,
    rank: RankOption = LORA_DEFAULTS.rank,
    alpha: AlphaOption = LORA_DEFAULTS.alpha,
    dropout: DropoutOption = LORA_DEFAULTS.dropout,
    targets: TargetsOption = DEFAULT_TARGETS_TEXT,
    init_seed: InitSeedOption = LORA_DEFAULTS.init_seed,
    epochs: Annotated[
        float | None,
        typer.Option(
            "--epochs",
            help="How long each round trains: passes over each device's own train split "
            "(a device with 10 documents and one with 500 both train a sensible amount; "
            f"training keeps its best validation point within it). Default: "
            f"{DEFAULT_ROUND_EPOCHS:g}.",
            min=0.001,
            show_default=False,
            rich_help_panel=_SCHEDULE,
        ),
    ] = None,
    warmup_epochs: Annotated[
        float | None,
        typer.Option(
            help="How long round 0 trains, in epochs (0: as long as any round). Default: "
            f"{DEFAULT_WARMUP_EPOCHS:g}.",
            min=0,
            show_default=False,
            rich_help_panel=_SCHEDULE,
        ),
    ] = None,
    max_steps: Annotated[
        int | None,
        typer.Option(
            help="The most steps a round trains, whatever a device holds (its time is "
            f"bounded). Default: {DEFAULT_MAX_STEPS}.",
            min=1,
            show_default=False,
            rich_help_panel=_SCHEDULE,
        ),
    ] = None,
    round_steps: Annotated[
        int | None,
        typer.Option(
            help="Or a schedule in steps, the same for every device: steps each round trains "
            "(replaces the epochs).",
            min=1,
            show_default=False,
            rich_help_panel=_SCHEDULE,
        ),
    ] = None,
    warmup_steps: Annotated[
        int | None,
        typer.Option(
            help="Or steps round 0 trains, in a schedule in steps (0: as many as any round; "
            f"later rounds {ROUND_STEPS_WITH_WARMUP} steps unless --round-steps is given).",
            min=0,
            show_default=False,
            rich_help_panel=_SCHEDULE,
        ),
    ] = None,
    max_staleness: Annotated[
        int,
        typer.Option(
            help="How many rounds old a peer's adapter may be and still be mixed: a device "
            "aggregating round r mixes each peer's freshest adapter of rounds r-N..r, so a "
            "device that is late or offline still counts (0: lock-step, only round r).",
            min=0,
        ),
    ] = DEFAULT_MAX_STALENESS,
    wait: Annotated[
        float,
        typer.Option(
            "--wait",
            help="How many seconds a round waits by default for its peers' adapters of the "
            "round before it mixes what it has (late adapters count next time).",
            min=0,
        ),
    ] = DEFAULT_WAIT_SECONDS,
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
            f"({temperatures_help()}; see docs/concepts/trust.md).",
            show_default=False,
        ),
    ] = None,
    se_temperature: Annotated[
        float | None,
        typer.Option(
            help="Or a default temperature in standard errors of each peer's paired score "
            "difference (perplexity, prediction; see docs/concepts/trust.md).",
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
    from edgefed.cli.builders import trust_settings
    from edgefed.device.federation import init_federation
    from edgefed.sync.backends import open_store
    from edgefed.sync.manifest import Schedule

    lora = LoraSpec(
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        targets=LoraSpec.parse_targets(targets),
        init_seed=init_seed,
    )
    if trust_scheme(trust).needs_mixtures:
        raise ConfigError(
            f"{trust} trust needs every device's known data mixture, which only a simulation has",
            "choose another --trust for a federation",
        )
    defaults = trust_settings(trust=trust, temperature=temperature, se_temperature=se_temperature)
    in_steps = round_steps is not None or warmup_steps is not None
    if in_steps and (epochs, warmup_epochs, max_steps) != (None, None, None):
        raise ConfigError(
            "the schedule is given both in steps (--round-steps/--warmup-steps) and in epochs "
            "(--epochs/--warmup-epochs/--max-steps)",
            "give one kind: epochs of each device's own text, or the same steps for all",
        )
    if in_steps:
        amounts = {
            "warmup_steps": warmup_steps,
            "round_steps": round_steps or ROUND_STEPS_WITH_WARMUP,
        }
    else:
        amounts = {
            "warmup_epochs": DEFAULT_WARMUP_EPOCHS if warmup_epochs is None else warmup_epochs,
            "round_epochs": epochs or DEFAULT_ROUND_EPOCHS,
            "max_steps": max_steps or DEFAULT_MAX_STEPS,
        }
    schedule = Schedule(
        **amounts,
        max_staleness=max_staleness,
        wait_seconds=wait,
    )
    with open_store(store, token=store_token(token_file)) as opened:
        federation = init_federation(
            opened,
            base=base,
            lora=lora,
            schedule=schedule,
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
        + (f" --token-file {token_file}" if token_file is not None else ""),
        soft_wrap=True,
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
    save_token: Annotated[
        bool,
        typer.Option(
            help="Keep the relay token in the workspace (file `token`, mode 0600) so later "
            "commands need no --token-file.",
        ),
    ] = True,
    as_json: JsonOption = False,
) -> None:
    """Join a federation: check the data, make this device's workspace and key, register the
    public key. The data must hold at least 3 documents (train, trust-validation and test each
    get one); it never leaves the device."""
    from edgefed.device.federation import check_data, join_federation
    from edgefed.sync.backends import open_store

    token = store_token(token_file)
    with open_store(store, token=token) as opened:
        joined = join_federation(opened, device, data=data, workspace=workspace, base=base)
    warn_skipped(check_data(data).skipped)  # joined: the data is known to be usable
    if token and save_token:
        joined.save_token(token)
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
            "lossy (see docs/concepts/protocol.md)."
        ),
    ] = False,
    dp_clip: DpClipOption = None,
    dp_noise_multiplier: DpNoiseOption = 0.0,
    min_peers: MinPeersOption = None,
    wait: WaitOption = None,
    workspace: WorkspaceOption = None,
    token_file: TokenFileOption = None,
    as_json: JsonOption = False,
) -> None:
    """Publish this device's adapter for a round and pull its peers' verified adapters."""
    from edgefed.device.publish import publish_adapter
    from edgefed.device.pull import WaitInterrupted, pull_round
    from edgefed.device.workspace import find_workspace
    from edgefed.sync.backends import open_store

    ws = find_workspace(workspace)
    dp = dp_noise(dp_clip, dp_noise_multiplier)
    if dp is not None:
        stderr.print(dp.describe())
    with open_store(ws.config.store, token=store_token(token_file, ws)) as opened:
        published = adapter is not None and publish_adapter(
            opened, ws, round_number, adapter, compress=compress, dp=dp
        )
        with ProgressDisplay() as display, stop_on_signals() as should_stop:
            try:
                report = pull_round(
                    opened,
                    ws,
                    round_number,
                    min_peers=min_peers,
                    wait_seconds=ws.federation.schedule.wait_seconds if wait is None else wait,
                    on_wait=lambda state: display.status(describe_wait(state)),
                    should_stop=should_stop,
                )
            except WaitInterrupted as stop:
                display.close()
                stderr.print(f"{stop}; what arrived so far is in the workspace.")
                raise typer.Exit(EXIT_INTERRUPTED) from None
    if as_json:
        emit_json({"round": round_number, "published": published} | report.as_dict())
        return
    warning = went_on_without(round_number, report.as_dict())
    if warning:
        stderr.print(f"[yellow]warning:[/] {warning}", highlight=False)
    stdout.print(
        f"round {round_number}: {'published' if published else 'nothing new published'}; "
        f"{counted(len(report.verified), 'peer adapter')} verified: "
        f"{', '.join(report.verified) or 'none'}"
    )
    for rejection in report.rejected:
        stdout.print(f"  rejected {rejection['device']}: {rejection['reason']}")


@user_errors
def status(
    workspace: WorkspaceOption = None,
    token_file: TokenFileOption = None,
    as_json: JsonOption = False,
) -> None:
    """The federation, every device's latest round (and who left), this device's publishes
    that peers would refuse, rejections, and this device's last published metrics."""
    from edgefed.device.federation import federation_status
    from edgefed.device.workspace import find_workspace
    from edgefed.sync.backends import open_store

    ws = find_workspace(workspace)
    with open_store(ws.config.store, token=store_token(token_file, ws)) as opened:
        report = federation_status(opened, ws)
    if as_json:
        emit_json(report)
        return
    current = report["current_round"]
    stdout.print(
        f"federation {report['federation']} in {report['store']}; "
        + ("no round published yet" if current is None else f"newest round published: {current}"),
        soft_wrap=True,
        highlight=False,
    )
    me = report["device"]
    stdout.print(
        f"this device: {me}, "
        + (
            "left the federation (runs no more rounds)"
            if report["devices"].get(me, {}).get("left") or ws.config.left is not None
            else f"next round {report['next_round']}"
        ),
        highlight=False,
    )
    table = Table("device", "latest round", "state", title_justify="left")
    for name, info in report["devices"].items():
        latest = info["latest_round"]
        state = "left" if info["left"] else ("this device" if name == report["device"] else "")
        table.add_row(name, "-" if latest is None else str(latest), state)
    stdout.print(table)
    for number, why in report["damaged_publishes"].items():
        stderr.print(
            f"[yellow]warning:[/] this device's round {number} in the store would be refused by "
            f"its peers ({why}); publish a replacement with `edgefed repair --round {number}`",
            highlight=False,
        )
    for rejection in report["rejected"]:
        stdout.print(
            f"rejected {rejection['device']} round {rejection['round']}: {rejection['reason']}",
            soft_wrap=True,
        )
    metrics = report["last_metrics"]
    if metrics:
        shown = ", ".join(
            f"{k.replace('_', ' ')} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
            for k, v in metrics.items()
        )
        stdout.print(f"last published round's metrics: {shown}")


@user_errors
def leave(
    workspace: WorkspaceOption = None,
    token_file: TokenFileOption = None,
    yes: Annotated[
        bool,
        typer.Option(
            "--yes", "-y", help="Leave without asking (a script, or stdin not a terminal)."
        ),
    ] = False,
) -> None:
    """Leave the federation: publish this device's signed departure so its peers stop waiting
    for it. Its adapters already published stay usable by them; the workspace stays, but runs
    no more rounds (join again under a new name to come back). This cannot be undone, so it
    asks first (--yes does not)."""
    from edgefed.device.federation import leave_federation
    from edgefed.device.workspace import find_workspace
    from edgefed.sync.backends import open_store

    ws = find_workspace(workspace)
    if ws.config.left is None and not yes:
        question = (
            f"{ws.device} leaves federation {ws.federation.id} for good: the name can never run "
            "another round. Leave?"
        )
        if not sys.stdin.isatty():
            raise ConfigError(
                f"leaving is permanent and nobody is at a terminal to confirm it for {ws.device}",
                "pass --yes to leave",
            )
        if not typer.confirm(question, default=False, err=True):
            stderr.print("nothing changed")
            raise typer.Exit(1)
    with open_store(ws.config.store, token=store_token(token_file, ws)) as opened:
        left = leave_federation(opened, ws)
    stdout.print(
        f"{ws.device} left the federation; its peers stop waiting for it"
        if left
        else f"{ws.device} had already left on {ws.config.left}"
    )


@user_errors
def repair(
    round_number: Annotated[
        int | None,
        typer.Option(
            "--round", "-r", help="Only this round. Default: every round that needs it.", min=0
        ),
    ] = None,
    adapter: Annotated[
        Path | None,
        typer.Option(
            help="The adapter the round published, for a round published by hand with `sync "
            "--adapter` (a round's own training is found in the workspace).",
            show_default=False,
        ),
    ] = None,
    compress: Annotated[
        bool, typer.Option(help="Send int8 codes instead of float16 (half the bytes, lossy).")
    ] = False,
    workspace: WorkspaceOption = None,
    token_file: TokenFileOption = None,
    as_json: JsonOption = False,
) -> None:
    """Check this device's published adapters as a peer would, and publish a signed
    replacement (the next version; nothing is overwritten) of each one that is damaged or
    lost in the store. Peers use the highest version that verifies."""
    from edgefed.device.federation import check_own_publishes
    from edgefed.device.publish import republish_adapter
    from edgefed.device.workspace import find_workspace
    from edgefed.errors import ConfigError
    from edgefed.sync.backends import open_store

    if adapter is not None and round_number is None:
        raise ConfigError(
            "--adapter names one round's adapter", "give the round it was published for: --round R"
        )
    ws = find_workspace(workspace)
    with open_store(ws.config.store, token=store_token(token_file, ws)) as opened:
        problems = check_own_publishes(opened, ws)
        if round_number is not None:
            problems = {r: why for r, why in problems.items() if r == round_number}
        repaired = {
            number: republish_adapter(opened, ws, number, adapter=adapter, compress=compress)
            for number in sorted(problems)
        }
    if as_json:
        emit_json(
            {
                "repaired": {
                    str(r): {"version": v, "problem": problems[r]} for r, v in repaired.items()
                }
            }
        )
        return
    if not repaired:
        stdout.print("every published adapter of this device verifies; nothing to repair")
    for number, version in repaired.items():
        stdout.print(
            f"round {number}: published version {version} (was: {problems[number]})",
            soft_wrap=True,
        )
