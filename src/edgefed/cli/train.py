"""`edgefed train`: a QLoRA adapter from local text, with progress, checkpoints and resume."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edgefed.cli.builders import BaseOptions, train_config
from edgefed.cli.options import (
    LORA_DEFAULTS,
    BaseOption,
    BatchSizeOption,
    Bf16Option,
    DeviceOption,
    EpochsOption,
    GradientCheckpointingOption,
    JsonOption,
    KeepLastOption,
    LearningRateOption,
    PrecisionOption,
    RuntimeQuantOption,
    SeqLenOption,
    StepsOption,
    ThreadsOption,
)
from edgefed.cli.output import emit_json, stderr, stdout, user_errors, warn_skipped
from edgefed.cli.progress import EXIT_INTERRUPTED, ProgressDisplay, stop_on_signals
from edgefed.documents import DEFAULT_TEXT_FIELD
from edgefed.loaded_base import DEFAULT_DEVICE, DEFAULT_PRECISION
from edgefed.plural import counted
from edgefed.runtime.quantize import DEFAULT_RUNTIME_QUANT
from edgefed.train.loop import TrainConfig
from edgefed.train.run import DEFAULT_VAL_TOKENS
from edgefed.train.split import SplitRule

_TRAINING = "Training"
_LORA = "LoRA adapter"
_DATA = "Data and splits"
_RUN = "Run"


@user_errors
def train(
    data: Annotated[
        Path,
        typer.Option(
            "--data",
            help="Your text: a file or folder of .txt/.md (a document each), .jsonl (a document "
            "per line) or .csv (a document per row).",
            show_default=False,
            rich_help_panel=_DATA,
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Run folder for the split, checkpoints and outputs (adapter/, adapter.gguf, "
            "metrics.json). A finished run's folder is never trained over.",
            show_default=False,
            rich_help_panel=_RUN,
        ),
    ],
    text_field: Annotated[
        str,
        typer.Option(
            help="JSON field (.jsonl) or column (.csv) holding the text.", rich_help_panel=_DATA
        ),
    ] = DEFAULT_TEXT_FIELD,
    split_seed: Annotated[
        int, typer.Option(help="Seed of the document split.", rich_help_panel=_DATA)
    ] = SplitRule.seed,
    val_fraction: Annotated[
        float,
        typer.Option(help="Share of documents for trust-validation.", rich_help_panel=_DATA),
    ] = SplitRule.val_fraction,
    test_fraction: Annotated[
        float, typer.Option(help="Share of documents held out for testing.", rich_help_panel=_DATA)
    ] = SplitRule.test_fraction,
    steps: StepsOption = None,
    epochs: EpochsOption = None,
    keep_last: KeepLastOption = False,
    seq_len: SeqLenOption = TrainConfig.seq_len,
    batch_size: BatchSizeOption = TrainConfig.batch_size,
    grad_accum: Annotated[
        int,
        typer.Option(help="Micro-batches per optimizer step.", min=1, rich_help_panel=_TRAINING),
    ] = TrainConfig.grad_accum,
    lr: LearningRateOption = TrainConfig.learning_rate,
    warmup: Annotated[
        float,
        typer.Option(
            help="Share of steps for linear warm-up before the cosine decay.",
            rich_help_panel=_TRAINING,
        ),
    ] = TrainConfig.warmup,
    weight_decay: Annotated[
        float, typer.Option(help="AdamW weight decay.", rich_help_panel=_TRAINING)
    ] = TrainConfig.weight_decay,
    max_grad_norm: Annotated[
        float, typer.Option(help="Gradient clipping norm.", rich_help_panel=_TRAINING)
    ] = TrainConfig.max_grad_norm,
    seed: Annotated[
        int, typer.Option(help="Seed of data order and dropout.", rich_help_panel=_TRAINING)
    ] = TrainConfig.seed,
    gradient_checkpointing: GradientCheckpointingOption = TrainConfig.gradient_checkpointing,
    bf16: Bf16Option = False,
    checkpoint_every: Annotated[
        int, typer.Option(help="Write a checkpoint every N steps.", min=1, rich_help_panel=_RUN)
    ] = TrainConfig.checkpoint_every,
    resume: Annotated[
        bool,
        typer.Option(
            help="Continue the checkpoint in --out (same data and options).", rich_help_panel=_RUN
        ),
    ] = False,
    rank: Annotated[
        int | None,
        typer.Option(
            help=f"LoRA rank. Default: {LORA_DEFAULTS.rank}.", min=1, rich_help_panel=_LORA
        ),
    ] = None,
    alpha: Annotated[
        float | None,
        typer.Option(
            help=f"LoRA alpha (scale = alpha/rank). Default: {LORA_DEFAULTS.alpha:g}.",
            rich_help_panel=_LORA,
        ),
    ] = None,
    dropout: Annotated[
        float | None,
        typer.Option(
            help=f"LoRA dropout. Default: {LORA_DEFAULTS.dropout:g}.", rich_help_panel=_LORA
        ),
    ] = None,
    targets: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated modules to adapt. Default: all attention and MLP projections.",
            rich_help_panel=_LORA,
        ),
    ] = None,
    init_seed: Annotated[
        int | None,
        typer.Option(
            help="Seed of the initial adapter (A random, B zero): devices of one federation "
            f"share it so their adapters are comparable. Default: {LORA_DEFAULTS.init_seed}.",
            rich_help_panel=_LORA,
        ),
    ] = None,
    from_adapter: Annotated[
        Path | None,
        typer.Option(
            "--from",
            help="Continue this adapter (a PEFT folder or an edgefed run folder) instead of a "
            "fresh one; its rank, alpha and targets are kept.",
            show_default=False,
            rich_help_panel=_LORA,
        ),
    ] = None,
    optimizer_state: Annotated[
        Path | None,
        typer.Option(
            help="AdamW state (optimizer.safetensors of an earlier run) to continue with.",
            show_default=False,
            rich_help_panel=_LORA,
        ),
    ] = None,
    base: BaseOption = None,
    precision: PrecisionOption = DEFAULT_PRECISION,
    device: DeviceOption = DEFAULT_DEVICE,
    threads: ThreadsOption = None,
    runtime_quant: RuntimeQuantOption = DEFAULT_RUNTIME_QUANT,
    eval_tokens: Annotated[
        int,
        typer.Option(
            help="Trust-validation tokens scored for the reported perplexity (0: all).",
            min=0,
            rich_help_panel=_RUN,
        ),
    ] = DEFAULT_VAL_TOKENS,
    as_json: JsonOption = False,
) -> None:
    """Train a LoRA adapter on your text over the 4-bit base (QLoRA) and score it with llama.cpp.

    Documents are split into train / trust-validation / test by a seeded hash of their text,
    so adding files never moves an old document. Ctrl-C or SIGTERM stops after the current
    step with a checkpoint; run the same command with --resume to finish the run exactly as if
    it had never stopped.
    """
    from edgefed.adapter import LoraSpec
    from edgefed.errors import ConfigError
    from edgefed.train.loop import TrainingInterrupted
    from edgefed.train.run import train_adapter

    config = train_config(
        seq_len=seq_len,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        warmup=warmup,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        steps=steps,
        epochs=epochs,
        keep_last=keep_last,
        seed=seed,
        checkpoint_every=checkpoint_every,
        gradient_checkpointing=gradient_checkpointing,
        bf16=bf16,
    )
    rule = SplitRule(seed=split_seed, val_fraction=val_fraction, test_fraction=test_fraction)
    given = {"rank": rank, "alpha": alpha, "dropout": dropout, "init_seed": init_seed}
    given = {k: v for k, v in given.items() if v is not None}
    if targets is not None:
        given["targets"] = LoraSpec.parse_targets(targets)
    if from_adapter is not None and given:
        raise ConfigError(
            "--from continues an adapter with its own rank, alpha, dropout and targets; "
            "--rank/--alpha/--dropout/--targets/--init-seed shape a fresh one",
            "give one or the other",
        )
    lora = replace(LORA_DEFAULTS, **given) if given else None

    display = ProgressDisplay()

    def on_data(summary) -> None:
        parts = ", ".join(
            f"{name} {summary.documents[name]:,} docs / {summary.tokens[name]:,} tokens"
            for name in summary.documents
        )
        stderr.print(f"data: {parts}", soft_wrap=True)
        warn_skipped(summary.skipped_files)
        if summary.duplicates:
            copies = (
                "1 duplicate document"
                if summary.duplicates == 1
                else f"{summary.duplicates} duplicate documents"
            )
            stderr.print(f"note: {copies} kept once")

    try:
        with (
            BaseOptions(precision, device, runtime_quant, threads).load(base) as loaded,
            stop_on_signals() as should_stop,
        ):
            result = train_adapter(
                data,
                out,
                loaded,
                config=config,
                lora=lora,
                split_rule=rule,
                text_field=text_field,
                from_adapter=from_adapter,
                optimizer_state=optimizer_state,
                resume=resume,
                eval_tokens=eval_tokens or None,
                on_status=display.status,
                on_data=on_data,
                on_progress=display.progress,
                should_stop=should_stop,
            )
    except TrainingInterrupted as stop:
        display.close()
        stderr.print(
            f"interrupted after step {stop.step}/{stop.total_steps}; checkpoint saved to "
            f"{stop.checkpoint}. Run the same command with --resume to continue."
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None
    finally:
        display.close()

    metrics = result.metrics
    if as_json:
        emit_json(
            {"format": metrics.FORMAT}
            | metrics.as_dict()
            | {"outputs": {"adapter": str(result.adapter_dir), "gguf": str(result.gguf_adapter)}}
        )
        return
    table = Table(
        title=f"trained {counted(metrics.steps, 'step')} in {result.out_dir}", title_justify="left"
    )
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("tokens seen", f"{metrics.tokens_seen:,}")
    table.add_row("train tokens/s", f"{metrics.train_tokens_per_second:,.0f}")
    table.add_row("final train loss", f"{metrics.loss_curve[-1][1]:.4f}")
    table.add_row("trust-val perplexity, base", f"{metrics.val.base_perplexity:.3f}")
    table.add_row("trust-val perplexity, adapter", f"{metrics.val.perplexity:.3f}")
    if metrics.stopping:
        kept = metrics.stopping["kept"]
        table.add_row(
            "kept", f"step {metrics.stopping['kept_step']}" if kept == "trained" else kept
        )
    table.add_row("wall time", f"{metrics.wall_seconds:.1f} s")
    table.add_row("peak RSS", f"{metrics.peak_rss_bytes / 2**20:,.0f} MiB")
    table.add_row("PEFT adapter", str(result.adapter_dir))
    table.add_row("GGUF adapter", str(result.gguf_adapter))
    stdout.print(table)
