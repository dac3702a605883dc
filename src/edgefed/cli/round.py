"""`edgefed round`: train → publish → pull → aggregate → evaluate, resumable after any crash."""

from __future__ import annotations

from typing import Annotated

import typer

from edgefed.cli.options import (
    BatchSizeOption,
    ByTokensOption,
    ClipNormOption,
    DeviceOption,
    DpClipOption,
    DpNoiseOption,
    JsonOption,
    LearningRateOption,
    MergeOption,
    PrecisionOption,
    RuntimeQuantOption,
    SeqLenOption,
    TemperatureOption,
    ThreadsOption,
    ThresholdOption,
    TokenFileOption,
    TopKOption,
    TrustOption,
    WorkspaceOption,
    dp_noise,
    store_token,
)
from edgefed.cli.output import emit_json, render_evaluation, stderr, stdout, user_errors
from edgefed.cli.progress import EXIT_INTERRUPTED, ProgressDisplay, stop_on_signals
from edgefed.device.evaluate import DEFAULT_TEST_TOKENS
from edgefed.loaded_base import DEFAULT_DEVICE, DEFAULT_PRECISION
from edgefed.runtime.quantize import DEFAULT_RUNTIME_QUANT
from edgefed.train.loop import TrainConfig
from edgefed.trust.settings import DEFAULT_MERGE

_TRAINING = "Training"
_SYNC = "Sync"


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
    top_k: TopKOption = None,
    threshold: ThresholdOption = None,
    merge: MergeOption = DEFAULT_MERGE,
    by_tokens: ByTokensOption = False,
    clip_norm: ClipNormOption = None,
    precision: PrecisionOption = DEFAULT_PRECISION,
    seq_len: SeqLenOption = TrainConfig.seq_len,
    batch_size: BatchSizeOption = TrainConfig.batch_size,
    lr: LearningRateOption = TrainConfig.learning_rate,
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
    min_peers: Annotated[
        int,
        typer.Option(
            help="Wait until this many peers' adapters are verified.", min=0, rich_help_panel=_SYNC
        ),
    ] = 0,
    wait: Annotated[
        float,
        typer.Option(
            help="Wait at most this many seconds for --min-peers.", min=0, rich_help_panel=_SYNC
        ),
    ] = 0.0,
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

    Round 0 trains the federation's warm-up steps from its shared initial adapter; every later
    round trains its round steps from the previous round's mix. Each step is recorded when it
    finishes, so after a crash or Ctrl-C the same command resumes where it stopped and never
    trains a finished round again.
    """
    from edgefed.device.federation import check_ready
    from edgefed.device.round import RoundOptions, run_round
    from edgefed.device.workspace import find_workspace
    from edgefed.loaded_base import LoadedBase
    from edgefed.sync.backends import open_store
    from edgefed.train.loop import TrainingInterrupted
    from edgefed.trust.settings import TrustSettings

    options = RoundOptions(
        trust=TrustSettings(
            scheme=trust,
            temperature=temperature,
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
            seed=seed,
            checkpoint_every=checkpoint_every,
        ),
        dp=dp_noise(dp_clip, dp_noise_multiplier),
        compress=compress,
        min_peers=min_peers,
        wait_seconds=wait,
        test_tokens=test_tokens or None,
    )
    ws = find_workspace(workspace)
    if options.dp is not None:
        stderr.print(options.dp.describe())
    display = ProgressDisplay()

    def on_step(number: int, step: str, done: bool) -> None:
        if done:
            stderr.print(f"round {number}: {step} finished earlier, skipped")
        else:
            display.status(f"round {number}: {step}")

    try:
        with (
            LoadedBase(
                ws.config.base,
                precision=precision,
                device=device,
                runtime_quant=runtime_quant,
                threads=threads,
            ) as loaded,
            open_store(ws.config.store, token=store_token(token_file)) as store,
            stop_on_signals() as should_stop,
        ):
            display.status("checking the store, this device's registration and its data")
            check_ready(store, ws)
            report = run_round(
                store,
                ws,
                loaded,
                round_number,
                options=options,
                on_step=on_step,
                on_status=display.status,
                on_progress=display.progress,
                should_stop=should_stop,
            )
    except TrainingInterrupted as stop:
        display.close()
        stderr.print(
            f"interrupted after step {stop.step}/{stop.total_steps} with a checkpoint; run "
            "`edgefed round` again to resume."
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None
    finally:
        display.close()

    if as_json:
        emit_json(report.as_dict())
        return
    steps = report.record.steps
    pull = steps["pull"]
    stdout.print(
        f"round {report.round}: trained {steps['train']['steps']} steps; "
        f"{len(pull['verified_peers'])} peer adapter(s) verified, {pull['rejected']} rejected"
    )
    render_evaluation(report.evaluation)
