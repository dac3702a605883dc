"""One round of one device: train → sync → aggregate → evaluate, resumable step by step.

    rounds/<r>/train/          the round's `edgefed train` run folder (metrics.json = done)
    rounds/<r>/peers/          verified peer adapters (sync)
    rounds/<r>/aggregated/     the mix, and aggregated.gguf, trust.json (aggregate)
    rounds/<r>/evaluation.json the test-split report (evaluate)
    rounds/<r>/round.json      which steps finished, when, and what they did

A step is recorded in round.json only after its outputs are in place, and a rerun skips every
recorded step; a step whose outputs exist but whose record does not (a crash between the two)
is recognised by its outputs and recorded without being redone. A crash inside a step resumes
it: training from its last checkpoint, publishing from the blob already uploaded. So a rerun
after any crash finishes the round, and a finished round is never trained twice.

Schedule (the federation's): round 0 trains `warmup_steps` local steps (`round_steps` when the
warm-up is 0); every later round trains `round_steps` steps from the previous round's mix, with
the previous round's AdamW state (the optimizer state never leaves the device).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

from edgefed.adapter import LoraSpec
from edgefed.atomic import atomic_write_text
from edgefed.device.aggregate import (
    AGGREGATED_DIR,
    DEFAULT_VAL_TOKENS,
    TRUST_FILE,
    aggregate_round,
)
from edgefed.device.evaluate import (
    DEFAULT_TEST_TOKENS,
    EVALUATION_FILE,
    TRAIN_DIR,
    evaluate_round,
    read_evaluation,
)
from edgefed.device.federation import publish_metrics, sync_round
from edgefed.device.workspace import Workspace
from edgefed.errors import InputFileError
from edgefed.faults import crash_point
from edgefed.privacy import DpNoise
from edgefed.sync.manifest import now
from edgefed.sync.store import Store
from edgefed.train.loaded_base import LoadedBase
from edgefed.train.loop import TrainConfig
from edgefed.train.run import CHECKPOINT_FILE, METRICS_FILE, OPTIMIZER_FILE, train_adapter

ROUND_STEPS = ("train", "sync", "aggregate", "evaluate")
ROUND_FILE = "round.json"


@dataclass(frozen=True)
class RoundOptions:
    """How this device runs its rounds; None means the federation's default."""

    trust: str | None = None
    temperature: float | None = None
    top_k: int | None = None
    threshold: float | None = None
    merge: str = "factors"
    by_tokens: bool = False
    train: TrainConfig = field(default_factory=TrainConfig)  # steps come from the schedule
    precision: str = "nf4"
    device: str = "auto"
    compress: bool = False
    min_peers: int = 0
    wait_seconds: float = 0.0
    threads: int | None = None
    runtime_quant: str | None = None
    test_tokens: int | None = DEFAULT_TEST_TOKENS
    val_tokens: int | None = DEFAULT_VAL_TOKENS  # trust-validation tokens scored (None: all)
    clip_norm: float | None = None  # bound on each peer's ΔW norm before mixing
    dp: DpNoise | None = None  # clipping and noise on the published adapter


@dataclass(frozen=True)
class RoundReport:
    """What a call did: the steps it ran, those it found finished, and the round's record."""

    round: int
    ran: list[str]
    skipped: list[str]
    record: dict
    evaluation: dict | None

    def as_dict(self) -> dict:
        return asdict(self)


def read_round_record(workspace: Workspace, round_number: int) -> dict:
    path = workspace.round_dir(round_number) / ROUND_FILE
    if not path.is_file():
        return {"round": round_number, "steps": {}}
    return json.loads(path.read_text(encoding="utf-8"))


def next_round(workspace: Workspace) -> int:
    """The first round this device has not finished (0 for a new device)."""
    for round_number in workspace.rounds():
        if "evaluate" not in read_round_record(workspace, round_number)["steps"]:
            return round_number
    return max(workspace.rounds(), default=-1) + 1


def round_train_steps(schedule: dict, round_number: int) -> int:
    if round_number == 0 and schedule["warmup_steps"] > 0:
        return int(schedule["warmup_steps"])
    return int(schedule["round_steps"])


class _Round:
    """The steps of one round over one workspace; each returns what round.json records."""

    def __init__(
        self, store, workspace, round_number, options, on_status, on_progress, stop, loaded
    ):
        self.store, self.workspace, self.round, self.options = (
            store,
            workspace,
            round_number,
            options,
        )
        self.on_status, self.on_progress, self.stop, self.loaded = (
            on_status,
            on_progress,
            stop,
            loaded,
        )
        self.dir = workspace.round_dir(round_number)
        self.run_dir = self.dir / TRAIN_DIR

    def finished_outputs(self, step: str) -> bool:
        """Whether the step's outputs are complete although round.json may not say so."""
        return {
            "train": (self.run_dir / METRICS_FILE).is_file(),
            "sync": False,  # cheap and idempotent: redone when unrecorded
            "aggregate": (self.dir / TRUST_FILE).is_file(),
            "evaluate": (self.dir / EVALUATION_FILE).is_file(),
        }[step]

    def train(self) -> dict:
        previous = self.workspace.round_dir(self.round - 1)
        start = None
        if self.round > 0:
            start = previous / AGGREGATED_DIR
            if not (previous / TRUST_FILE).is_file():
                raise InputFileError(
                    f"round {self.round - 1} is not aggregated yet, so round {self.round} has "
                    "no adapter to start from",
                    f"run `edgefed round --round {self.round - 1}` first",
                )
        optimizer = previous / TRAIN_DIR / OPTIMIZER_FILE if self.round > 0 else None
        federation = self.workspace.federation
        config = replace(
            self.options.train,
            steps=round_train_steps(federation["schedule"], self.round),
            epochs=None,
            seed=self.options.train.seed + self.round,  # a new data order every round
        )
        result = train_adapter(
            self.workspace.config["data"],
            self.run_dir,
            base=self.workspace.config["base"],
            config=config,
            lora=None if start else LoraSpec.from_dict(federation["lora"]),
            from_adapter=start,
            optimizer_state=optimizer if optimizer and optimizer.is_file() else None,
            resume=(self.run_dir / CHECKPOINT_FILE).is_file(),
            precision=self.options.precision,
            device=self.options.device,
            threads=self.options.threads,
            runtime_quant=self.options.runtime_quant,
            eval_tokens=self.options.val_tokens,
            loaded=self.loaded,
            on_status=self.on_status,
            on_progress=self.on_progress,
            should_stop=self.stop,
        )
        return self.train_record(result.metrics)

    def train_record(self, metrics: dict) -> dict:
        return {
            "steps": metrics["steps"],
            "tokens_seen": metrics["tokens_seen"],
            "from": metrics["from_adapter"],
            "val_perplexity": metrics["val"]["perplexity"],
        }

    def sync(self) -> dict:
        tokens, metrics = publish_metrics(self.run_dir)
        self.on_status("publishing the adapter and pulling peers")
        report = sync_round(
            self.store,
            self.workspace,
            self.round,
            adapter=self.run_dir,
            train_tokens=tokens,
            metrics=metrics,
            compress=self.options.compress,
            dp=self.options.dp,
            min_peers=self.options.min_peers,
            wait_seconds=self.options.wait_seconds,
            on_wait=lambda n, s: self.on_status(
                f"waiting for peers: {n}/{self.options.min_peers} after {s:.0f} s"
            ),
        )
        return {"verified_peers": report.verified, "rejected": len(report.rejected)}

    def aggregate(self) -> dict:
        self.on_status("computing the trust row and the mix")
        aggregate_round(
            self.workspace,
            self.round,
            self.run_dir,
            scheme=self.options.trust,
            temperature=self.options.temperature,
            top_k=self.options.top_k,
            threshold=self.options.threshold,
            merge=self.options.merge,
            by_tokens=self.options.by_tokens,
            runtime_quant=self.options.runtime_quant,
            val_tokens=self.options.val_tokens,
            clip_norm=self.options.clip_norm,
            loaded=self.loaded,
            threads=self.options.threads,
            on_progress=self.on_progress,
        )
        return self.aggregate_record()

    def aggregate_record(self) -> dict:
        trust = json.loads((self.dir / TRUST_FILE).read_text(encoding="utf-8"))
        return {
            "scheme": trust["scheme"],
            "weights": dict(zip(trust["devices"], trust["weights"], strict=True)),
            "merge": trust["merge"],
            "relative_error": trust["relative_error"],
        }

    def evaluate(self) -> dict:
        self.on_status("scoring base, local and aggregated adapters on the test split")
        return self.evaluate_record(
            evaluate_round(
                self.workspace,
                self.round,
                runtime_quant=self.options.runtime_quant,
                test_tokens=self.options.test_tokens,
                loaded=self.loaded,
                threads=self.options.threads,
                on_progress=self.on_progress,
            )
        )

    def evaluate_record(self, evaluation: dict) -> dict:
        return {name: m["perplexity"] for name, m in evaluation["models"].items()}

    def record_of_outputs(self, step: str) -> dict:
        """The record of a step found finished by its outputs."""
        if step == "train":
            return self.train_record(
                json.loads((self.run_dir / METRICS_FILE).read_text(encoding="utf-8"))
            )
        if step == "aggregate":
            return self.aggregate_record()
        return self.evaluate_record(read_evaluation(self.workspace, self.round))


def run_round(
    store: Store,
    workspace: Workspace,
    round_number: int | None = None,
    *,
    options: RoundOptions | None = None,
    on_step: Callable[[int, str, bool], None] | None = None,
    on_status: Callable[[str], None] | None = None,
    on_progress: Callable | None = None,
    should_stop: Callable[[], bool] | None = None,
    loaded: LoadedBase | None = None,
    until: str | None = None,
) -> RoundReport:
    """Run (or finish) a round of this device; `round_number` None: the next unfinished one.

    `on_step(round, step, skipped)` is called as each step starts or is found finished;
    `on_progress` gets training's TrainProgress and scoring's ScoreProgress events. Raises
    the EdgefedError subclasses of the steps, and TrainingInterrupted when `should_stop` turns
    true during training (the checkpoint is kept; a rerun resumes it). `loaded` runs every
    step over one already loaded base (the simulation's N devices share one). `until` stops
    after that step (the simulation trains every device before any of them syncs).
    """
    if until is not None and until not in ROUND_STEPS:
        raise ValueError(f"until must be one of {ROUND_STEPS}")
    options = options or RoundOptions()
    if round_number is None:
        round_number = next_round(workspace)
    steps = _Round(
        store,
        workspace,
        round_number,
        options,
        on_status or (lambda message: None),
        on_progress,
        should_stop,
        loaded,
    )
    record = read_round_record(workspace, round_number)
    ran, skipped = [], []
    for step in ROUND_STEPS:
        done = step in record["steps"] or steps.finished_outputs(step)
        if on_step is not None:
            on_step(round_number, step, done)
        if step in record["steps"]:
            skipped.append(step)
            continue
        if done:
            details = steps.record_of_outputs(step)
            skipped.append(step)
        else:
            started = time.monotonic()
            details = {
                "train": steps.train,
                "sync": steps.sync,
                "aggregate": steps.aggregate,
                "evaluate": steps.evaluate,
            }[step]()
            details["seconds"] = round(time.monotonic() - started, 2)
            ran.append(step)
        crash_point(f"round-{step}")
        record["steps"][step] = details | {"finished": now()}
        atomic_write_text(
            workspace.round_dir(round_number) / ROUND_FILE, json.dumps(record, indent=1) + "\n"
        )
        if step == until:
            break
    return RoundReport(
        round=round_number,
        ran=ran,
        skipped=skipped,
        record=record,
        evaluation=read_evaluation(workspace, round_number),
    )
