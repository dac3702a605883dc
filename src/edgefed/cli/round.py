"""`edgefed round`: train → publish → pull → aggregate → evaluate, resumable after any crash."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from edgefed.cli.builders import BaseOptions, train_config, trust_settings
from edgefed.cli.options import (
    BatchSizeOption,
    Bf16Option,
    ByTokensOption,
    CheckpointEveryOption,
    ClipNormOption,
    CompressOption,
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
    RoundSeedOption,
    RoundTestTokensOption,
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
from edgefed.device.round import RoundOptions
from edgefed.loaded_base import DEFAULT_DEVICE, DEFAULT_PRECISION
from edgefed.runtime.quantize import DEFAULT_RUNTIME_QUANT
from edgefed.train.loop import TrainConfig
from edgefed.trust.settings import DEFAULT_MERGE

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
    seed: RoundSeedOption = TrainConfig.seed,
    checkpoint_every: CheckpointEveryOption = TrainConfig.checkpoint_every,
    device: DeviceOption = DEFAULT_DEVICE,
    compress: CompressOption = False,
    min_peers: MinPeersOption = None,
    wait: WaitOption = None,
    dp_clip: DpClipOption = None,
    dp_noise_multiplier: DpNoiseOption = 0.0,
    test_tokens: RoundTestTokensOption = DEFAULT_TEST_TOKENS,
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
    _drive_rounds(
        _Rounds(first=round_number, count=1, loop=False),
        RoundOptions(
            trust=trust_settings(
                trust=trust,
                temperature=temperature,
                se_temperature=se_temperature,
                top_k=top_k,
                threshold=threshold,
                merge=merge,
                by_tokens=by_tokens,
                clip_norm=clip_norm,
            ),
            train=train_config(
                seq_len=seq_len,
                batch_size=batch_size,
                lr=lr,
                bf16=bf16,
                gradient_checkpointing=gradient_checkpointing,
                steps=steps,
                epochs=epochs,
                keep_last=keep_last,
                seed=seed,
                checkpoint_every=checkpoint_every,
            ),
            dp=dp_noise(dp_clip, dp_noise_multiplier),
            compress=compress,
            min_peers=min_peers,
            wait_seconds=wait,
            test_tokens=test_tokens or None,
        ),
        BaseOptions(precision, device, runtime_quant, threads),
        workspace=workspace,
        token_file=token_file,
        as_json=as_json,
    )


@user_errors
def run_command(
    rounds: Annotated[
        int | None,
        typer.Option(
            "--rounds",
            "-n",
            help="Rounds to run, then stop. Default: until stopped.",
            min=1,
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
    seed: RoundSeedOption = TrainConfig.seed,
    checkpoint_every: CheckpointEveryOption = TrainConfig.checkpoint_every,
    device: DeviceOption = DEFAULT_DEVICE,
    compress: CompressOption = False,
    min_peers: MinPeersOption = None,
    wait: WaitOption = None,
    dp_clip: DpClipOption = None,
    dp_noise_multiplier: DpNoiseOption = 0.0,
    test_tokens: RoundTestTokensOption = DEFAULT_TEST_TOKENS,
    workspace: WorkspaceOption = None,
    token_file: TokenFileOption = None,
    threads: ThreadsOption = None,
    runtime_quant: RuntimeQuantOption = DEFAULT_RUNTIME_QUANT,
    as_json: JsonOption = False,
) -> None:
    """Keep this device going: round after round (`--rounds N`, or until Ctrl-C or SIGTERM),
    each exactly as `edgefed round` runs it, with one summary line per round (test
    perplexity, peers mixed, time).

    A store that stops answering between rounds is tried again with backoff, not fatal; after
    a crash or a stop the same command resumes the unfinished round. Stop it with Ctrl-C: it
    finishes the step it is in (training saves a checkpoint) and exits.
    """
    _drive_rounds(
        _Rounds(first=None, count=rounds, loop=True),
        RoundOptions(
            trust=trust_settings(
                trust=trust,
                temperature=temperature,
                se_temperature=se_temperature,
                top_k=top_k,
                threshold=threshold,
                merge=merge,
                by_tokens=by_tokens,
                clip_norm=clip_norm,
            ),
            train=train_config(
                seq_len=seq_len,
                batch_size=batch_size,
                lr=lr,
                bf16=bf16,
                gradient_checkpointing=gradient_checkpointing,
                steps=steps,
                epochs=epochs,
                keep_last=keep_last,
                seed=seed,
                checkpoint_every=checkpoint_every,
            ),
            dp=dp_noise(dp_clip, dp_noise_multiplier),
            compress=compress,
            min_peers=min_peers,
            wait_seconds=wait,
            test_tokens=test_tokens or None,
        ),
        BaseOptions(precision, device, runtime_quant, threads),
        workspace=workspace,
        token_file=token_file,
        as_json=as_json,
    )


@dataclass(frozen=True)
class _Rounds:
    """Which rounds a command runs: `round` one (`first`, or the next unfinished), `run`
    `count` (None: until stopped) and rides out store outages between them (`loop`)."""

    first: int | None
    count: int | None
    loop: bool


RETRY_SECONDS = (10, 30, 60, 120, 300)  # `run` between tries of a store that does not answer


def _drive_rounds(
    rounds: _Rounds,
    options: RoundOptions,
    base: BaseOptions,
    *,
    workspace: Path | None,
    token_file: Path | None,
    as_json: bool,
) -> None:
    """The rounds of `round` and `run` over this device's workspace (`workspace`, else the
    only one), its store and its base, with progress on stderr and the reports on stdout."""
    from edgefed.device.aggregate import device_trust_settings
    from edgefed.device.federation import check_ready
    from edgefed.device.pull import WaitInterrupted
    from edgefed.device.round import estimate_round, run_round
    from edgefed.device.workspace import find_workspace
    from edgefed.sync.backends import open_store
    from edgefed.sync.store import StoreUnreachable
    from edgefed.train.loop import TrainingInterrupted

    ws = find_workspace(workspace)
    device_trust_settings(ws, options.trust)  # settings that cannot mix fail before training
    if options.dp is not None:
        stderr.print(options.dp.describe())
    display = ProgressDisplay()

    def on_wait(state: WaitState) -> None:
        display.status(describe_wait(state))

    def on_step(number: int, step: str, done: bool) -> None:
        if done:
            if not rounds.loop:
                stderr.print(f"round {number}: {step} finished earlier, skipped")
        else:
            display.status(f"round {number}: {step}")

    reports = []
    try:
        with (
            base.load(ws.config.base) as loaded,
            open_store(ws.config.store, token=store_token(token_file, ws)) as store,
            stop_on_signals() as should_stop,
        ):
            display.status("checking the store, this device's registration and its data")
            warn_skipped(check_ready(store, ws).skipped)
            loaded.check_trainable()
            failures = 0
            loaded.on_status = display.status  # the first use builds the runtime's cache
            while rounds.count is None or len(reports) < rounds.count:
                number = ws.next_round() if rounds.first is None else rounds.first
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
                        rounds.first,
                        options=options,
                        on_step=on_step,
                        on_status=display.status,
                        on_progress=display.progress,
                        on_wait=on_wait,
                        should_stop=should_stop,
                    )
                except StoreUnreachable as exc:
                    if not rounds.loop:
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
                _report_round(report, details=not rounds.loop and not as_json, quiet=as_json)
                if should_stop():
                    break
    except (TrainingInterrupted, WaitInterrupted) as stop:
        display.close()
        again = "edgefed run" if rounds.loop else "edgefed round"
        stderr.print(f"{stop}; run `{again}` again to resume.")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    finally:
        display.close()
    if as_json:
        documents = [r.as_dict() for r in reports]
        emit_json(documents if rounds.loop else documents[0])


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
