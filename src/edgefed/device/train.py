"""The train step: this round's local steps, from the previous round's mix.

Round 0 trains the federation's warm-up (its round amount when the warm-up is 0) from the
shared initial adapter; every later round trains its round amount from the previous round's
mix, with the previous round's AdamW state (the optimizer state never leaves the device). The
amount is the federation's schedule (epochs of this device's own train split, capped in steps;
or steps) unless this device overrides it (`--epochs`, `--steps`). Training keeps its best
validation point and never an adapter worse than where it started (`edgefed.train.stopping`).
A crash inside the step resumes from the run's last checkpoint.

Every round of a device splits its data the same way, or a later round could train on a document
an earlier round held out and its numbers would not compare: a round's run folder starts from the
latest earlier round's split.json, so each document keeps its recorded split (see
`edgefed.train.split`) and only documents added since are assigned anew.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from edgefed.atomic import atomic_write_text
from edgefed.device.workspace import Workspace
from edgefed.errors import InputFileError
from edgefed.loaded_base import LoadedBase
from edgefed.train.loop import TrainConfig, TrainProgress
from edgefed.train.metrics import TrainMetrics
from edgefed.train.run import DEFAULT_VAL_TOKENS, train_adapter


def train_round(
    workspace: Workspace,
    round_number: int,
    loaded: LoadedBase,
    config: TrainConfig | None = None,
    *,
    val_tokens: int | None = DEFAULT_VAL_TOKENS,
    on_status: Callable[[str], None] | None = None,
    on_progress: Callable[[TrainProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainMetrics:
    """Train (or finish training) the round's adapter into the workspace; its metrics.

    The length is `config`'s steps or epochs when it sets one, else the federation's
    schedule (`round_training`); the seed moves with the round (a new data order every
    round); `config` gives the rest. Raises InputFileError when the previous round is not
    aggregated yet, and what `train_adapter` raises.
    """
    workspace.check_base(loaded)
    config = config or TrainConfig()
    federation = workspace.federation
    run = workspace.train_run(round_number)
    start = optimizer = None
    if round_number > 0:
        if workspace.read_trust(round_number - 1) is None:
            raise InputFileError(
                f"round {round_number - 1} is not aggregated yet, so round {round_number} has "
                "no adapter to start from",
                f"run `edgefed round --round {round_number - 1}` first",
            )
        start = workspace.aggregated_dir(round_number - 1)
        previous_optimizer = workspace.train_run(round_number - 1).optimizer
        optimizer = previous_optimizer if previous_optimizer.is_file() else None
        _carry_split_record(workspace, round_number)
    result = train_adapter(
        workspace.config.data,
        run.root,
        loaded,
        config=replace(
            round_training(workspace, round_number, config), seed=config.seed + round_number
        ),
        lora=None if start else federation.lora,
        from_adapter=start,
        optimizer_state=optimizer,
        resume=run.checkpoint.is_file(),
        eval_tokens=val_tokens,
        on_status=on_status,
        on_progress=on_progress,
        should_stop=should_stop,
    )
    return result.metrics


def round_training(workspace: Workspace, round_number: int, config: TrainConfig) -> TrainConfig:
    """`config` with the round's length: its own steps or epochs (a device's override) when it
    sets one, else the federation schedule's for the round. Epochs of its own keep the
    schedule's step cap (a device with much text still trains a bounded time); steps are
    exactly what the device asked for."""
    training = workspace.federation.schedule.training_of(round_number)
    if config.steps is not None:
        return config
    if config.epochs is not None:
        return replace(config, max_steps=config.max_steps or training.max_steps)
    return replace(
        config, steps=training.steps, epochs=training.epochs, max_steps=training.max_steps
    )


def _carry_split_record(workspace: Workspace, round_number: int) -> None:
    """Start the round's split.json as a copy of the latest earlier round's, unless it has one."""
    target = workspace.train_run(round_number).split
    if target.exists():
        return
    for earlier in range(round_number - 1, -1, -1):
        source = workspace.train_run(earlier).split
        if source.is_file():
            atomic_write_text(target, source.read_text(encoding="utf-8"))
            return
