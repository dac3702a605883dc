"""`edgefed round`: train → publish → pull → aggregate → evaluate, resumable after any crash."""

from __future__ import annotations

import inspect
import time
from typing import TYPE_CHECKING, Annotated

import typer

from edgefed.cli.options import (
    BatchSizeOption,
    Bf16Option,
    ByTokensOption,
    ClipNormOption,
    DeviceOption,
    DpClipOption,
    DpNoiseOption,
    EpochsOption,
    GradientCheckpointingOption,
    JsonOption,
    KeepLastOption,
    LearningRateOption,
    MergeOption,
    MinPeersOption,
    PrecisionOption,
    RuntimeQuantOption,
    SeqLenOption,
    SeTemperatureOption,
    StepsOption,
    TemperatureOption,
    ThreadsOption,
    ThresholdOption,
    TokenFileOption,
    TopKOption,
    TrustOption,
    WaitOption,
    WorkspaceOption,
    dp_noise,
    store_token,
)
from edgefed.cli.output import (
    emit_json,
    render_evaluation,
    stderr,
    stdout,
    user_errors,
    warn_skipped,
)
from edgefed.cli.progress import EXIT_INTERRUPTED, ProgressDisplay, stop_on_signals
from edgefed.cli.round_report import describe_wait, round_summary, went_on_without
from edgefed.device.evaluate import DEFAULT_TEST_TOKENS
from edgefed.loaded_base import DEFAULT_DEVICE, DEFAULT_PRECISION
from edgefed.runtime.quantize import DEFAULT_RUNTIME_QUANT
from edgefed.train.loop import TrainConfig
from edgefed.trust.settings import DEFAULT_MERGE

_TRAINING = "Training"
_SYNC = "Sync"

if TYPE_CHECKING:
    from edgefed.device.pull import WaitState


@user_errors
def round_command(
    round_number: Annotated[
        int | None,
        typer.Option(
            "--round",
            "-r",
            help="The round to run or finish. Default: this device's first unfinished round.",
            min=0,
            show_default=False,
        ),
    ] = None,
    trust: TrustOption = None,
    temperature: TemperatureOption = None,
    se_temperature: SeTemperatureOption = None,
    top_k: TopKOption = None,
    threshold: ThresholdOption = None,
    merge: MergeOption = DEFAULT_MERGE,
    by_tokens: ByTokensOption = False,
    clip_norm: ClipNormOption = None,
    precision: PrecisionOption = DEFAULT_PRECISION,
    epochs: EpochsOption = None,
    steps: StepsOption = None,
    keep_last: KeepLastOption = False,
    seq_len: SeqLenOption = TrainConfig.seq_len,
    batch_size: BatchSizeOption = TrainConfig.batch_size,
    lr: LearningRateOption = TrainConfig.learning_rate,
    bf16: Bf16Option = False,
    gradient_checkpointing: GradientCheckpointingOption = TrainConfig.gradient_checkpointing,
    seed: Annotated[
        int,
        typer.Option(help="Seed of data order (plus the round number).", rich_help_panel=_TRAINING),
    ] = TrainConfig.seed,
    checkpoint_every: Annotated[
        int,
        typer.Option(
            help="Write a training checkpoint every N steps.", min=1, rich_help_panel=_TRAINING
        ),
    ] = TrainConfig.checkpoint_every,
    device: DeviceOption = DEFAULT_DEVICE,
    compress: Annotated[
        bool,
        typer.Option(
            help="Publish int8 codes instead of float16 (half the bytes, lossy).",
            rich_help_panel=_SYNC,
        ),
    ] = False,
    min_peers: MinPeersOption = None,
    wait: WaitOption = None,
    dp_clip: DpClipOption = None,
    dp_noise_multiplier: DpNoiseOption = 0.0,
    test_tokens: Annotated[
        int,
        typer.Option(help="Test-split tokens scored by the evaluation (0: all).", min=0),
    ] = DEFAULT_TEST_TOKENS,
    workspace: WorkspaceOption = None,
    token_file: TokenFileOption = None,
    threads: ThreadsOption = None,
    runtime_quant: RuntimeQuantOption = DEFAULT_RUNTIME_QUANT,
    as_json: JsonOption = False,
) -> None:
    """Run one round of this device: train, publish and pull, mix by trust, evaluate.

    Round 0 trains the federation's warm-up from its shared initial adapter; every later round
    trains the round's amount (epochs of this device's own text, capped in steps; --epochs or
    --steps override it) from the previous round's mix. Training keeps its best point on
    held-out validation tokens, and an adapter that makes the model worse than where it started
    is never published: the round warns and keeps its start (or the bare base, if better). The
    pull waits for the peers' adapters of the round up to the federation's wait, showing who
    has published, and says by name whom it went on without. Each step is recorded when it
    finishes, so after a crash or Ctrl-C the same command resumes where it stopped and never
    trains a finished round again.
    """
    settings = dict(locals())
    _drive_rounds(first=settings.pop("round_number"), count=1, **settings)


def run_command(rounds: int | None = None, **settings) -> None:
    """Keep this device going: round after round (`--rounds N`, or until Ctrl-C or SIGTERM),
    each exactly as `edgefed round` runs it, with one summary line per round (test
    perplexity, peers mixed, time).

    A store that stops answering between rounds is tried again with backoff, not fatal; after
    a crash or a stop the same command resumes the unfinished round. Stop it with Ctrl-C: it
    finishes the step it is in (training saves a checkpoint) and exits.
    """
    _drive_rounds(first=None, count=rounds, loop=True, **settings)


_RoundsOption = Annotated[
    int | None,
    typer.Option(
        "--rounds",
        "-n",
        help="Rounds to run, then stop. Default: until stopped.",
        min=1,
        show_default=False,
    ),
]

# `run` takes every option of `round` (one list of options, one meaning), with --rounds for
# --round
_round_parameters = inspect.signature(round_command, eval_str=True).parameters
run_command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [
        inspect.Parameter(
            "rounds", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=_RoundsOption
        ),
        *(
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for name, p in _round_parameters.items()
            if name != "round_number"
        ),
    ]
)
run_command.__annotations__ = {
    name: p.annotation for name, p in run_command.__signature__.parameters.items()
}
run_command = user_errors(run_command)

RETRY_SECONDS = (10, 30, 60, 120, 300)  # `run` between tries of a store that does not answer


def _drive_rounds(
    *,
    first: int | None,
    count: int | None,
    loop: bool = False,
    trust,
    temperature,
    se_temperature,
    top_k,
    threshold,
    merge,
    by_tokens,
    clip_norm,
    precision,
    epochs,
    steps,
    keep_last,
    seq_len,
    batch_size,
    lr,
    bf16,
    gradient_checkpointing,
    seed,
    checkpoint_every,
    device,
    compress,
    min_peers,
    wait,
    dp_clip,
    dp_noise_multiplier,
    test_tokens,
    workspace,
    token_file,
    threads,
    runtime_quant,
    as_json,
) -> None:
    """`round` (one round, `first` or the next) and `run` (`count` rounds, None: until
    stopped; `loop` rides out store outages between rounds)."""
    from edgefed.device.aggregate import device_trust_settings
    from edgefed.device.federation import check_ready
    from edgefed.device.pull import WaitInterrupted
    from edgefed.device.round import RoundOptions, estimate_round, run_round
    from edgefed.device.workspace import find_workspace
    from edgefed.loaded_base import LoadedBase
    from edgefed.sync.backends import open_store
    from edgefed.sync.store import StoreUnreachable
    from edgefed.train.loop import TrainingInterrupted
    from edgefed.trust.settings import TrustSettings

    options = RoundOptions(
        trust=TrustSettings(
            scheme=trust,
            temperature=temperature,
            se_temperature=se_temperature,
            top_k=top_k,
            threshold=threshold,
            merge=merge,
            clip_norm=clip_norm,
            by_tokens=by_tokens,
        ),
        train=TrainConfig(
            seq_len=seq_len,
            batch_size=batch_size,
            learning_rate=lr,
            bf16=bf16,
            gradient_checkpointing=gradient_checkpointing,
            seed=seed,
            checkpoint_every=checkpoint_every,
            steps=steps,
            epochs=epochs,
            stop_at_best=not keep_last,
        ),
        dp=dp_noise(dp_clip, dp_noise_multiplier),
        compress=compress,
        min_peers=min_peers,
        wait_seconds=wait,
        test_tokens=test_tokens or None,
    )
    ws = find_workspace(workspace)
    device_trust_settings(ws, options.trust)  # settings that cannot mix fail before training
    if options.dp is not None:
        stderr.print(options.dp.describe())
    display = ProgressDisplay()

    def on_wait(state: WaitState) -> None:
        display.status(describe_wait(state))

    def on_step(number: int, step: str, done: bool) -> None:
        if done:
            if not loop:
                stderr.print(f"round {number}: {step} finished earlier, skipped")
        else:
            display.status(f"round {number}: {step}")

    reports = []
    try:
        with (
            LoadedBase(
                ws.config.base,
                precision=precision,
                device=device,
                runtime_quant=runtime_quant,
                threads=threads,
            ) as loaded,
            open_store(ws.config.store, token=store_token(token_file, ws)) as store,
            stop_on_signals() as should_stop,
        ):
            display.status("checking the store, this device's registration and its data")
            warn_skipped(check_ready(store, ws).skipped)
            loaded.check_trainable()
            failures = 0
            loaded.on_status = display.status  # the first use builds the runtime's cache
            while count is None or len(reports) < count:
                number = ws.next_round() if first is None else first
                if not as_json and "train" not in ws.read_round_record(number).steps:
                    estimate = estimate_round(ws, number, options)
                    stderr.print(
                        estimate.describe()
                        if estimate
                        else f"round {number}: no estimate (no round finished at these settings)",
                        highlight=False,
                    )
                try:
                    report = run_round(
                        store,
                        ws,
                        loaded,
                        first,
                        options=options,
                        on_step=on_step,
                        on_status=display.status,
                        on_progress=display.progress,
                        on_wait=on_wait,
                        should_stop=should_stop,
                    )
                except StoreUnreachable as exc:
                    if not loop:
                        raise
                    pause = RETRY_SECONDS[min(failures, len(RETRY_SECONDS) - 1)]
                    failures += 1
                    display.close()
                    stderr.print(
                        f"[yellow]warning:[/] {exc}; trying again in {pause} s", highlight=False
                    )
                    _sleep_unless_stopped(pause, should_stop)
                    if should_stop():
                        break
                    continue
                failures = 0
                reports.append(report)
                display.close()
                _report_round(report, details=not loop and not as_json, quiet=as_json)
                if should_stop():
                    break
    except (TrainingInterrupted, WaitInterrupted) as stop:
        display.close()
        again = "edgefed run" if loop else "edgefed round"
        stderr.print(f"{stop}; run `{again}` again to resume.")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    finally:
        display.close()
    if as_json:
        documents = [r.as_dict() for r in reports]
        emit_json(documents if loop else documents[0])


def _sleep_unless_stopped(seconds: float, should_stop) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not should_stop():
        time.sleep(min(1.0, deadline - time.monotonic()))


def _report_round(report, *, details: bool, quiet: bool) -> None:
    """A warning for the peers the round went without, its summary line, and for `round` the
    test table and trust row."""
    if quiet:
        return
    warning = went_on_without(report.round, report.record.steps["pull"])
    if warning:
        stderr.print(f"[yellow]warning:[/] {warning}", highlight=False)
    stdout.print(round_summary(report.record), highlight=False, soft_wrap=True)
    if details:
        render_evaluation(report.evaluation)
