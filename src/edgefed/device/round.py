"""One round of one device, as the protocol has it: train → publish → pull → aggregate →
evaluate, resumable step by step (each step is its own module of `edgefed.device`).

A step is recorded in round.json (`RoundRecord`) only after its outputs are in place, and a
rerun skips every recorded step; a step whose outputs exist but whose record does not (a crash
between the two) is recognised by its outputs and recorded without being redone. A crash
inside a step resumes it: training from its last checkpoint, publishing from the blob already
uploaded. So a rerun after any crash finishes the round, and a finished round is never trained
twice. The simulation runs the same steps: `until="publish"` for every device, then the rest.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from edgefed.device.aggregate import DEFAULT_VAL_TOKENS, aggregate_round, device_trust_settings
from edgefed.device.evaluate import DEFAULT_TEST_TOKENS, evaluate_round
from edgefed.device.publish import publish_adapter
from edgefed.device.pull import WaitState, pull_round
from edgefed.device.records import ROUND_STEPS, EvaluationRecord, RoundRecord
from edgefed.device.train import round_training, train_round
from edgefed.device.workspace import Workspace
from edgefed.errors import ConfigError
from edgefed.faults import crash_point
from edgefed.loaded_base import LoadedBase
from edgefed.plural import counted
from edgefed.privacy import DpNoise
from edgefed.sync.manifest import now
from edgefed.sync.store import Store
from edgefed.train.loop import TrainConfig
from edgefed.train.metrics import TrainMetrics
from edgefed.trust.settings import TrustSettings


@dataclass(frozen=True)
class RoundOptions:
    """How this device runs its rounds (the resources are the LoadedBase's)."""

    trust: TrustSettings = field(default_factory=TrustSettings)  # unset: the federation's
    train: TrainConfig = field(default_factory=TrainConfig)  # no steps/epochs: the schedule's
    compress: bool = False
    dp: DpNoise | None = None  # clipping and noise on the published adapter
    min_peers: int | None = None  # fresh peers to wait for; None: every peer taking part
    wait_seconds: float | None = None  # None: the federation's default wait
    test_tokens: int | None = DEFAULT_TEST_TOKENS
    val_tokens: int | None = DEFAULT_VAL_TOKENS  # trust-validation tokens scored (None: all)
    # every device's known data mixture (label -> documents), for oracle trust: only a
    # simulation, which dealt the data, knows them
    mixtures: Mapping[str, Mapping[str, float]] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.trust, TrustSettings):
            raise ConfigError(
                f"trust is {self.trust!r}, not a TrustSettings", "pass trust=TrustSettings(...)"
            )
        if (self.min_peers or 0) < 0 or (self.wait_seconds or 0) < 0:
            raise ConfigError(
                f"min-peers {self.min_peers} / wait {self.wait_seconds} s is negative",
                "give --min-peers and --wait of 0 or more",
            )


@dataclass(frozen=True)
class RoundReport:
    """What a call did: the steps it ran, those it found finished, and the round's record."""

    round: int
    ran: list[str]
    skipped: list[str]
    record: RoundRecord
    evaluation: EvaluationRecord | None

    def as_dict(self) -> dict:
        return {
            "round": self.round,
            "ran": self.ran,
            "skipped": self.skipped,
            "record": self.record.as_dict(),
            "evaluation": None if self.evaluation is None else self.evaluation.as_dict(),
        }


def _train_record(metrics: TrainMetrics) -> dict:
    stopping = metrics.stopping or {}
    return {
        "steps": metrics.steps,
        "tokens_seen": metrics.tokens_seen,
        # passes over this device's own train split
        "epochs": round(metrics.tokens_seen / max(1, metrics.data["tokens"]["train"]), 2),
        "from": metrics.from_adapter,
        "val_perplexity": metrics.val.perplexity,
        # what the run kept: "trained" (at `kept_step`), or "start" / "base" when training
        # made the model worse (`edgefed.train.stopping`)
        "kept": stopping.get("kept", "trained"),
        "kept_step": stopping.get("kept_step", metrics.steps),
    }


class _Round:
    """The steps of one round over one workspace; each returns what round.json records."""

    def __init__(
        self,
        store: Store,
        workspace: Workspace,
        round_number: int,
        loaded: LoadedBase,
        options: RoundOptions,
        on_status: Callable[[str], None],
        on_progress: Callable | None,
        on_wait: Callable[[WaitState], None] | None,
        should_stop: Callable[[], bool] | None,
    ) -> None:
        self.store, self.workspace, self.round = store, workspace, round_number
        self.loaded, self.options = loaded, options
        self.on_status, self.on_progress, self.stop = on_status, on_progress, should_stop
        self.on_wait = on_wait
        self.run = workspace.train_run(round_number)

    def table(self) -> dict[str, Callable[[], dict]]:
        """The steps in the protocol's order (`ROUND_STEPS`), each with the method that runs it
        and returns what round.json records of it."""
        return {
            "train": self.train,
            "publish": self.publish,
            "pull": self.pull,
            "aggregate": self.aggregate,
            "evaluate": self.evaluate,
        }

    def finished_record(self, step: str) -> dict | None:
        """The record of a step whose outputs are complete although round.json may not say so;
        None when it must run (publish and pull are idempotent and always rerun)."""
        if step == "train" and self.run.is_finished():
            return _train_record(self.run.read_metrics())
        if step == "aggregate" and (trust := self.workspace.read_trust(self.round)):
            return self.aggregate_record(trust)
        if step == "evaluate" and (evaluation := self.workspace.read_evaluation(self.round)):
            return evaluation.perplexities()
        return None

    def train(self) -> dict:
        metrics = train_round(
            self.workspace,
            self.round,
            self.loaded,
            self.options.train,
            val_tokens=self.options.val_tokens,
            on_status=self.on_status,
            on_progress=self.on_progress,
            should_stop=self.stop,
        )
        return _train_record(metrics)

    def publish(self) -> dict:
        self.on_status("publishing the adapter")
        published = publish_adapter(
            self.store,
            self.workspace,
            self.round,
            self.run.root,
            compress=self.options.compress,
            dp=self.options.dp,
        )
        return {"published": published, "dp": self.options.dp is not None}

    def pull(self) -> dict:
        self.on_status("pulling the peers' adapters")
        wait = self.options.wait_seconds
        report = pull_round(
            self.store,
            self.workspace,
            self.round,
            min_peers=self.options.min_peers,
            wait_seconds=self.workspace.federation.schedule.wait_seconds if wait is None else wait,
            on_wait=self.on_wait,
            should_stop=self.stop,
        )
        return {
            "verified_peers": report.verified,
            "peer_rounds": report.peer_rounds,
            "rejected": len(report.rejected),
            "missing": report.missing(),
            "departed": list(report.departed),
            "waited_seconds": round(report.waited_seconds, 1),
        }

    def aggregate(self) -> dict:
        self.on_status("computing the trust row and the mix")
        aggregate_round(
            self.workspace,
            self.round,
            self.run.root,
            self.loaded,
            self.options.trust,
            val_tokens=self.options.val_tokens,
            mixtures=self.options.mixtures,
            on_progress=self.on_progress,
        )
        return self.aggregate_record(self.workspace.read_trust(self.round))

    @staticmethod
    def aggregate_record(trust) -> dict:
        return {
            "scheme": trust.scheme,
            "weights": trust.weights_by_device(),
            "merge": trust.merge,
            "relative_error": trust.relative_error,
        }

    def evaluate(self) -> dict:
        self.on_status("scoring base, local and aggregated adapters on the test split")
        evaluation = evaluate_round(
            self.workspace,
            self.round,
            self.loaded,
            test_tokens=self.options.test_tokens,
            on_progress=self.on_progress,
        )
        return evaluation.perplexities()


# the settings a step's tokens/s depends on: a speed measured at others says nothing of this round
_SPEED_SETTINGS = ("seq_len", "batch_size", "bf16")


@dataclass(frozen=True)
class RoundEstimate:
    """How long a round should take, from this device's own measured speeds."""

    round: int
    train_steps: int
    train_seconds: float  # at the training speed the last round measured
    train_tokens_per_second: float
    other_seconds: float  # publish, pull without waiting, aggregate, evaluate: as last time
    wait_seconds: float  # the most the pull may wait for peers

    def describe(self) -> str:
        def minutes(seconds: float) -> str:
            return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"

        work = minutes(self.train_seconds + self.other_seconds)
        waiting = f", plus up to {minutes(self.wait_seconds)} waiting for peers" * bool(
            self.wait_seconds
        )
        return (
            f"round {self.round}: about {work} ({counted(self.train_steps, 'training step')} at "
            f"{self.train_tokens_per_second:,.0f} tokens/s, scoring as long as last round)"
            f"{waiting}"
        )


def estimate_round(
    workspace: Workspace, round_number: int, options: RoundOptions | None = None
) -> RoundEstimate | None:
    """The round's expected duration from the last finished round's measured speeds; None
    before the first round (nothing measured yet)."""
    options = options or RoundOptions()
    finished = [
        r
        for r in workspace.rounds()
        if r < round_number
        and workspace.read_round_record(r).is_finished()
        and workspace.train_run(r).is_finished()
    ]
    if not finished:
        return None
    last = finished[-1]
    metrics = workspace.train_run(last).read_metrics()
    speed = metrics.train_tokens_per_second
    config = options.train
    measured, defaults = metrics.run["config"], TrainConfig()  # a default is left unrecorded
    same_arithmetic = all(
        measured.get(name, getattr(defaults, name)) == getattr(config, name)
        for name in _SPEED_SETTINGS
    )
    if speed <= 0 or not same_arithmetic:
        return None  # nothing measured at this round's arithmetic: no figure beats a wrong one
    steps = round_training(workspace, round_number, config).total_steps(
        int(metrics.data["train_blocks"])
    )
    record = workspace.read_round_record(last)
    waited = record.steps.get("pull", {}).get("waited_seconds", 0.0)
    other = sum(
        details.get("seconds", 0.0) for step, details in record.steps.items() if step != "train"
    ) + (metrics.stopping or {}).get("seconds", 0.0)
    wait = options.wait_seconds
    return RoundEstimate(
        round=round_number,
        train_steps=steps,
        train_seconds=steps * config.batch_size * config.grad_accum * (config.seq_len - 1) / speed,
        train_tokens_per_second=speed,
        other_seconds=max(0.0, other - waited),
        wait_seconds=workspace.federation.schedule.wait_seconds if wait is None else wait,
    )


def run_round(
    store: Store,
    workspace: Workspace,
    loaded: LoadedBase,
    round_number: int | None = None,
    *,
    options: RoundOptions | None = None,
    on_step: Callable[[int, str, bool], None] | None = None,
    on_status: Callable[[str], None] | None = None,
    on_progress: Callable | None = None,
    on_wait: Callable[[WaitState], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    until: str | None = None,
) -> RoundReport:
    """Run (or finish) a round of this device over `loaded`; `round_number` None: the next
    unfinished one.

    `on_step(round, step, skipped)` is called as each step starts or is found finished;
    `on_progress` gets training's TrainProgress and scoring's ScoreProgress events, `on_wait`
    the pull's WaitState while it waits for peers. Raises the EdgefedError subclasses of the
    steps, TrainingInterrupted when `should_stop` turns true during training (the checkpoint
    is kept; a rerun resumes it) and WaitInterrupted when it does while waiting for peers.
    `until` stops after that step (the simulation has every device publish before any pulls).
    """
    if until is not None and until not in ROUND_STEPS:
        raise ConfigError(f"no round step '{until}'", f"choose one of {', '.join(ROUND_STEPS)}")
    options = options or RoundOptions()
    device_trust_settings(workspace, options.trust, mixtures_known=options.mixtures is not None)
    if round_number is None:
        round_number = workspace.next_round()
    the_round = _Round(
        store,
        workspace,
        round_number,
        loaded,
        options,
        on_status or (lambda message: None),
        on_progress,
        on_wait,
        should_stop,
    )
    record = workspace.read_round_record(round_number)
    ran, skipped = [], []
    for step, run_step in the_round.table().items():
        if step in record.steps:
            if on_step is not None:
                on_step(round_number, step, True)
            skipped.append(step)
        else:
            details = the_round.finished_record(step)
            if on_step is not None:
                on_step(round_number, step, details is not None)
            if details is not None:
                skipped.append(step)
            else:
                started = time.monotonic()
                details = run_step()
                details["seconds"] = round(time.monotonic() - started, 2)
                ran.append(step)
            crash_point(f"round-{step}")
            record = replace(record, steps=record.steps | {step: details | {"finished": now()}})
            record.write(workspace.round_record_path(round_number))
        if step == until:
            break
    return RoundReport(
        round=round_number,
        ran=ran,
        skipped=skipped,
        record=record,
        evaluation=workspace.read_evaluation(round_number),
    )
