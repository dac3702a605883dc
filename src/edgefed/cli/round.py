"""`edgefed round`: train → sync → aggregate → evaluate, resumable after any crash."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from edgefed.cli.federation import TokenFileOption, WorkspaceOption, store_token
from edgefed.cli.options import (
    BatchSizeOption,
    ByTokensOption,
    ClipNormOption,
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
    TopKOption,
    TrustOption,
    dp_noise,
)
from edgefed.cli.output import emit_json, stderr, stdout, user_errors
from edgefed.cli.progress import EXIT_INTERRUPTED, ProgressDisplay, stop_on_signals

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
    merge: MergeOption = "factors",
    by_tokens: ByTokensOption = False,
    clip_norm: ClipNormOption = None,
    precision: PrecisionOption = "nf4",
    seq_len: SeqLenOption = 256,
    batch_size: BatchSizeOption = 4,
    lr: LearningRateOption = 1e-3,
    seed: Annotated[
        int,
        typer.Option(help="Seed of data order (plus the round number).", rich_help_panel=_TRAINING),
    ] = 0,
    checkpoint_every: Annotated[
        int,
        typer.Option(
            help="Write a training checkpoint every N steps.", min=1, rich_help_panel=_TRAINING
        ),
    ] = 25,
    device: Annotated[
        str, typer.Option(help="auto, cpu or cuda.", rich_help_panel=_TRAINING)
    ] = "auto",
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
    ] = 8192,
    workspace: WorkspaceOption = None,
    token_file: TokenFileOption = None,
    threads: ThreadsOption = None,
    runtime_quant: RuntimeQuantOption = "q8_0",
    as_json: JsonOption = False,
) -> None:
    """Run one round of this device: train, publish and pull, mix by trust, evaluate.

    Round 0 trains the federation's warm-up steps from its shared initial adapter; every later
    round trains its round steps from the previous round's mix. Each step is recorded when it
    finishes, so after a crash or Ctrl-C the same command resumes where it stopped and never
    trains a finished round again.
    """
    from edgefed.device.round import RoundOptions, run_round
    from edgefed.device.workspace import find_workspace
    from edgefed.errors import DataError
    from edgefed.sync.store import open_store
    from edgefed.train.loop import TrainConfig, TrainingInterrupted

    try:
        config = TrainConfig(
            seq_len=seq_len,
            batch_size=batch_size,
            learning_rate=lr,
            seed=seed,
            checkpoint_every=checkpoint_every,
        )
    except ValueError as exc:
        raise DataError(str(exc), "see edgefed round --help") from None
    options = RoundOptions(
        trust=trust,
        temperature=temperature,
        top_k=top_k,
        threshold=threshold,
        merge=merge,
        by_tokens=by_tokens,
        clip_norm=clip_norm,
        dp=dp_noise(dp_clip, dp_noise_multiplier),
        train=config,
        precision=precision,
        device=device,
        compress=compress,
        min_peers=min_peers,
        wait_seconds=wait,
        threads=threads,
        runtime_quant=runtime_quant,
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
            open_store(ws.config["store"], token=store_token(token_file)) as store,
            stop_on_signals() as should_stop,
        ):
            report = run_round(
                store,
                ws,
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
    steps = report.record["steps"]
    sync = steps["sync"]
    stdout.print(
        f"round {report.round}: trained {steps['train']['steps']} steps; "
        f"{len(sync['verified_peers'])} peer adapter(s) verified, {sync['rejected']} rejected"
    )
    render_evaluation(report.evaluation)


def render_evaluation(evaluation: dict) -> None:
    """The test-split table and the trust row: what `round` ends with and `evaluate` shows."""
    base = evaluation["models"]["base"]["perplexity"]
    table = Table(
        title=f"round {evaluation['round']}, {evaluation['device']}: perplexity on the test "
        f"split ({evaluation['tokens_scored']:,} tokens)",
        title_justify="left",
    )
    for column in ("model", "perplexity", "vs base"):
        table.add_column(column, justify="left" if column == "model" else "right")
    labels = {
        "base": "base",
        "local": "local (own training, before mixing)",
        "aggregated": "aggregated (trust-weighted mix)",
    }
    for name, label in labels.items():
        value = evaluation["models"][name]["perplexity"]
        table.add_row(label, f"{value:.3f}", f"{value / base - 1:+.1%}")
    stdout.print(table)
    trust = evaluation["trust"]
    row = Table("device", "weight", title=f"trust row ({trust['scheme']})", title_justify="left")
    for device, weight in zip(trust["devices"], trust["weights"], strict=True):
        row.add_row(device + (" (self)" if device == evaluation["device"] else ""), f"{weight:.3f}")
    stdout.print(row)
