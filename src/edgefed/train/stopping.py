"""Stop at the best, and never keep an adapter that wrecks the device's model.

A device with a dozen documents overfits them within a few epochs: its adapter's loss on text it
did not train on falls, then climbs past the bare base's. So a run scores its adapter on held-out
tokens of its own (the trust half of its trust-validation split, `validation_halves`) where it
starts, then every `every` steps and after the last step (or after PATIENCE evaluations without
a better point, when it stops training), and keeps the best point's LoRA tensors, the start
(step 0) included: a round that trains past its best from its first interval keeps
what it started from. Without that, a device whose every later round overshoots by a little
(within noise) would take each small step back, and over rounds its adapter drifts upwards
(measured: local training on 10 documents, docs/measurements/training.md).

Which tokens, and why. The test split reports results and must choose nothing. The selection
half of the trust-validation split is kept for the round's last decision, the choice among
candidate mixes (`edgefed.trust.choose`), so that choice is made on tokens nothing was fit to.
Stopping on the trust half makes the device's own adapter look a little better there than on
fresh text (the best of several points is picked on it), which can only tilt its trust row
towards itself; the choice among mixes checks that tilt on clean tokens.

The guard. The best trained point is compared with the references the run could have kept
without training: the adapter it started from (the previous round's mix) and the bare base
(the same thing in round 0, where B = 0). When the best trained point is worse than the better
reference by more than `GUARD_SIGMAS` paired standard errors (`trust.noise`, the same measure
trust rows use), training only hurt on evidence stronger than noise: the run keeps that
reference instead and says so. Scores come from the training copy in PyTorch with dropout off:
no export to llama.cpp per interval, and every point is scored by one model on one text, so
their differences are what is compared.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

from edgefed.trust.noise import PERPLEXITY_NOISE_FLOOR, paired_standard_error

# evaluations of a run, spread evenly over its steps, when no interval is given: enough to
# catch the best point of a run that overfits within it, few enough to cost little
# (docs/measurements/training.md, "Training: epochs, stopping at the best and the guard")
DEFAULT_EVALUATIONS = 8
# validation tokens scored at each point: the device's trust half, at most this many
DEFAULT_STOP_TOKENS = 2048
# how many paired standard errors worse than its references a trained adapter must be before
# the run keeps a reference instead: noise alone does not throw training away
GUARD_SIGMAS = 2.0
# evaluations in a row without a new best point (the start included) after which the run stops
# training: it is past its best, and the rest of the run would cost a laptop minutes to keep
# nothing of (a round from an adapter at its best, on a device with little text, overshoots
# from its first interval)
PATIENCE = 3

START, BASE, TRAINED = "start", "base", "trained"


def interval(total_steps: int, every: int | None) -> int:
    """Steps between two evaluations: `every`, or about DEFAULT_EVALUATIONS per run."""
    return every if every else max(1, math.ceil(total_steps / DEFAULT_EVALUATIONS))


@dataclass(frozen=True)
class StopOutcome:
    """What a run kept and why, as metrics.json records it.

    `kept` is "trained" (the best scored step), "start" (the adapter the run started from:
    no step scored better, or the guard) or "base" (no adapter, B = 0: the guard only).
    `guarded`: the guard fired, the best step was worse beyond noise. Losses are mean NLL in
    nats on the stopping tokens.
    """

    kept: str
    guarded: bool
    kept_step: int
    final_step: int
    best_step: int
    best_nll: float
    final_nll: float
    start_nll: float
    base_nll: float
    standard_error: float  # of best − better reference, paired
    tokens: int
    curve: list  # [step, mean NLL] of every scored point, step 0 the start
    seconds: float  # spent scoring

    @property
    def fell_back(self) -> bool:
        return self.kept != TRAINED

    @property
    def stopped_early(self) -> bool:
        return self.kept == TRAINED and self.kept_step < self.final_step

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """One line for a user: what was kept, in words and numbers."""
        ppl = math.exp
        if self.fell_back and not self.guarded:
            return (
                f"no step scored better on validation than where the run started (perplexity "
                f"{ppl(self.best_nll):.2f} at the best step {self.best_step}, "
                f"{ppl(self.start_nll):.2f} at the start): kept the adapter it started from"
            )
        if self.guarded:
            reference = "the adapter it started from" if self.kept == START else "the bare base"
            return (
                f"training made the model worse on its own validation text (perplexity "
                f"{ppl(self.best_nll):.2f} at its best step {self.best_step}, against "
                f"{ppl(min(self.start_nll, self.base_nll)):.2f} before training, "
                f"{(self.best_nll - min(self.start_nll, self.base_nll)) / self.standard_error:.1f}"
                f" standard errors): kept {reference} instead"
            )
        if self.stopped_early:
            return (
                f"kept step {self.kept_step} of {self.final_step}, its best on validation "
                f"(perplexity {ppl(self.best_nll):.2f}; {ppl(self.final_nll):.2f} after the last "
                f"step, {ppl(self.base_nll):.2f} for the base)"
            )
        return (
            f"kept the last step, {self.final_step} (validation perplexity "
            f"{ppl(self.final_nll):.2f}; {ppl(self.base_nll):.2f} for the base)"
        )


class Stopper:
    """Scores a training model at its start and at intervals; keeps the best point's tensors.

    `start(model, base_state)` scores the point the run begins from and, for a continued
    adapter, `base_state` (its tensors with every B zeroed: the bare base). The state that
    survives a checkpoint is `state()` / `restore()`: scoring never touches the RNG, so a
    resumed run takes the same steps and scores the same points.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        window: int,
        every: int,
        *,
        batch_size: int = 4,
        stop_at_best: bool = True,
    ) -> None:
        self.tokens, self.window, self.every = tokens, window, every
        self.batch_size = batch_size
        self.stop_at_best = stop_at_best
        self.curve: list[list[float]] = []
        self.nlls: dict[str, np.ndarray] = {}  # start, base, best, final per-token NLLs
        self.best_state: dict | None = None
        self.best_step = -1
        self.seconds = 0.0

    def _score(self, model) -> np.ndarray:
        import time

        from edgefed.train.loss import token_nlls

        started = time.perf_counter()
        nlls = token_nlls(model, self.tokens, window=self.window, batch_size=self.batch_size)
        self.seconds += time.perf_counter() - started
        return nlls

    def start(self, model, base_state: Mapping | None) -> None:
        """Score the start (and the bare base, when the start is a continued adapter)."""
        from edgefed.adapter import load_lora_state, lora_state

        start = self._score(model)
        self.nlls[START] = start
        if base_state is None:
            self.nlls[BASE] = start
        else:
            current = lora_state(model)
            load_lora_state(model, base_state)
            self.nlls[BASE] = self._score(model)
            load_lora_state(model, current)
        self.curve.append([0, float(start.mean())])

    def due(self, step: int, total_steps: int) -> bool:
        if step >= total_steps:
            return True
        return self.stop_at_best and step % self.every == 0

    def past_its_best(self) -> bool:
        """PATIENCE evaluations since the best point so far (the start included): stop."""
        means = [mean for _, mean in self.curve]
        return self.stop_at_best and len(means) - 1 - means.index(min(means)) >= PATIENCE

    def observe(self, model, step: int) -> None:
        """Score the model after `step` steps; keep its tensors if it is the best so far."""
        from edgefed.adapter import lora_state

        nlls = self._score(model)
        self.curve.append([step, float(nlls.mean())])
        self.nlls["final"] = nlls
        if self.best_state is None or nlls.mean() < self.nlls["best"].mean():
            self.nlls["best"] = nlls
            self.best_step = step
            self.best_state = {k: v.detach().clone() for k, v in lora_state(model).items()}

    def outcome(self) -> StopOutcome:
        """The decision at the end of the run (see the module docstring)."""
        best, final = self.nlls["best"], self.nlls["final"]
        start, base = self.nlls[START], self.nlls[BASE]
        reference_name, reference = (START, start) if start.mean() <= base.mean() else (BASE, base)
        error = (
            paired_standard_error(reference, best, PERPLEXITY_NOISE_FLOOR)
            if len(best) >= 2
            else math.inf
        )
        guarded = bool(best.mean() - reference.mean() > GUARD_SIGMAS * error)
        if guarded:
            kept = reference_name
        elif self.stop_at_best and start.mean() <= best.mean():
            kept = START  # the best point is step 0
        else:
            kept = TRAINED
        return StopOutcome(
            kept=kept,
            guarded=guarded,
            kept_step=self.best_step if kept == TRAINED else 0,
            final_step=int(self.curve[-1][0]),
            best_step=self.best_step,
            best_nll=float(best.mean()),
            final_nll=float(final.mean()),
            start_nll=float(start.mean()),
            base_nll=float(base.mean()),
            standard_error=float(error),
            tokens=len(best),
            curve=self.curve,
            seconds=round(self.seconds, 3),
        )

    # -- what a checkpoint carries -----------------------------------------------------------
    def state(self) -> tuple[dict, dict]:
        """(JSON-able meta, tensors) to save in a checkpoint."""
        import torch

        tensors = {f"nll.{k}": torch.from_numpy(v.copy()) for k, v in self.nlls.items()}
        if self.best_state is not None:
            tensors |= {f"best.{k}": v for k, v in self.best_state.items()}
        meta = {"curve": self.curve, "best_step": self.best_step, "seconds": self.seconds}
        return meta, tensors

    def restore(self, meta: Mapping, tensors: Mapping) -> None:
        self.curve = [list(point) for point in meta["curve"]]
        self.best_step = int(meta["best_step"])
        self.seconds = float(meta["seconds"])
        self.nlls = {
            k.removeprefix("nll."): v.numpy().astype(np.float64)
            for k, v in tensors.items()
            if k.startswith("nll.")
        }
        best = {k.removeprefix("best."): v for k, v in tensors.items() if k.startswith("best.")}
        self.best_state = best or None
