"""The QLoRA training loop: AdamW on the LoRA tensors, warm-up + cosine, accumulation, clipping.

Resumable by construction. Everything a step depends on is either a pure function of
(seed, step) — which blocks form the batch, the learning rate — or saved in the checkpoint —
the LoRA tensors, AdamW's moments and the torch RNG that LoRA dropout draws from. Stopping is
cooperative: the caller's `should_stop` is polled after each optimizer step, and a stop writes a
checkpoint before `TrainingInterrupted` is raised, so Ctrl-C or SIGTERM never loses more than
the step in flight.
"""

from __future__ import annotations

import functools
import logging
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgefed.adapter import lora_state
from edgefed.errors import ConfigError, TrainingError
from edgefed.faults import crash_point
from edgefed.memory import release_freed_memory
from edgefed.train.blocks import PAD, TokenBlocks
from edgefed.train.checkpoint import Checkpoint, save_checkpoint
from edgefed.train.stopping import Stopper

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. Either `steps` or `epochs` decides the length (one epoch if none)."""

    seq_len: int = 256
    batch_size: int = 4
    grad_accum: int = 1
    learning_rate: float = 1e-3
    warmup: float = 0.05  # share of all steps spent warming up linearly
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    steps: int | None = None
    epochs: float | None = None
    seed: int = 0
    checkpoint_every: int = 25
    # recompute activations in backward: the same adapter, about half a round's peak memory
    # (a third with the huge pages edgefed asks for), 0.82-0.87x the speed
    # (docs/measurements/memory.md)
    gradient_checkpointing: bool = True
    # matmuls in bfloat16 under torch.autocast (AVX-512 BF16 on a CPU, tensor cores on a GPU);
    # the weights, LoRA factors, optimizer state and the loss's softmax stay float32
    bf16: bool = False
    # with epochs: the most steps a run may take (a device with much text trains a bounded time)
    max_steps: int | None = None
    # score held-out tokens every `eval_every` steps (None: about 8 times a run) and keep the
    # best point's adapter (`edgefed.train.stopping`); False: score only the start and the end
    # (the guard against a wrecked adapter still applies)
    stop_at_best: bool = True
    eval_every: int | None = None

    def __post_init__(self) -> None:
        if self.steps is not None and self.epochs is not None:
            raise ConfigError(
                "--steps and --epochs are both given", "give either steps or epochs, not both"
            )
        if (self.max_steps is not None and self.max_steps < 1) or (
            self.eval_every is not None and self.eval_every < 1
        ):
            raise ConfigError(
                f"max steps {self.max_steps} / evaluation interval {self.eval_every} is below 1",
                "give max_steps and eval_every of at least 1",
            )
        for name in ("seq_len", "batch_size", "grad_accum", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"{name} is {getattr(self, name)}", f"give a {name} of at least 1"
                )
        if (self.steps is not None and self.steps < 1) or (
            self.epochs is not None and self.epochs <= 0
        ):
            raise ConfigError(
                f"steps {self.steps} / epochs {self.epochs} are not positive",
                "give a positive --steps or --epochs",
            )
        if not 0 <= self.warmup < 1:
            raise ConfigError(
                f"warm-up {self.warmup} is not a share of the steps", "give a --warmup in [0, 1)"
            )

    def total_steps(self, n_blocks: int) -> int:
        if self.steps is not None:
            return self.steps
        per_epoch = math.ceil(n_blocks / self.batch_size)
        steps = max(1, math.ceil((self.epochs or 1.0) * per_epoch / self.grad_accum))
        return min(steps, self.max_steps) if self.max_steps else steps

    def as_dict(self) -> dict:
        """The fields; those added later only when not at their default, so runs from before
        they existed still resume."""
        values = asdict(self)
        for name, default in _LATER_FIELDS.items():
            if values[name] == default:
                del values[name]
        return values


_LATER_FIELDS = {"bf16": False, "max_steps": None, "stop_at_best": True, "eval_every": None}


@dataclass(frozen=True)
class TrainProgress:
    """What the loop reports after each optimizer step."""

    step: int
    total_steps: int
    loss: float
    learning_rate: float
    tokens_seen: int
    tokens_per_second: float


@dataclass
class TrainState:
    """How far a run got: carried in checkpoints and in the final metrics."""

    step: int = 0
    tokens_seen: int = 0
    seconds: float = 0.0
    loss_curve: list[tuple[int, float]] = field(default_factory=list)


class TrainingInterrupted(Exception):
    """Training stopped on request after `step` steps; the checkpoint at `checkpoint` holds it."""

    def __init__(self, step: int, total_steps: int, checkpoint: Path) -> None:
        self.step, self.total_steps, self.checkpoint = step, total_steps, checkpoint
        super().__init__(f"interrupted after step {step}/{total_steps}")


def learning_rate_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay towards 0, for the 0-based `step`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class BatchOrder:
    """Which blocks make micro-batch m: each epoch is a permutation drawn from (seed, epoch)."""

    def __init__(self, n_blocks: int, batch_size: int, seed: int) -> None:
        self.n_blocks, self.batch_size, self.seed = n_blocks, batch_size, seed
        self.per_epoch = math.ceil(n_blocks / batch_size)
        self._epoch, self._permutation = -1, np.arange(0)

    def micro_batch(self, m: int) -> np.ndarray:
        epoch, index = divmod(m, self.per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._permutation = np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
        return self._permutation[index * self.batch_size : (index + 1) * self.batch_size]


def _batch_tensors(tokens: np.ndarray, device):
    import torch

    from edgefed.train.loss import IGNORE

    ids = torch.from_numpy(tokens.astype(np.int64))
    padding = ids == PAD
    input_ids = ids.masked_fill(padding, 0).to(device)
    attention_mask = (~padding).long().to(device)
    labels = ids.masked_fill(padding, IGNORE).to(device)
    return input_ids, attention_mask, labels


def cpu_has_bf16_matmul() -> bool:
    """Whether PyTorch has a fast bfloat16 matmul on this CPU: its oneDNN kernels, which need
    AVX-512 (and are faster than float32 with AVX-512 BF16 or AMX). Without them PyTorch falls
    back to scalar bfloat16 code, and --bf16 training measured 20x slower than float32 on an
    AVX2-only EPYC (docs/measurements/training.md, Training speed). Only x86 is judged (Arm has
    its own paths), and a check that a later PyTorch no longer offers answers True: it must
    never stop training."""
    import torch

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    try:
        return bool(
            torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
    except (AttributeError, RuntimeError):
        return True


@functools.cache
def warn_emulated_bf16() -> None:
    """Once per process: a simulation trains many devices and each would say it again."""
    logger.warning(
        "--bf16 on an x86 CPU without AVX-512: PyTorch has no fast bfloat16 matmul here and "
        "training runs many times slower than float32 (20x measured on an AVX2-only CPU, "
        "docs/measurements/training.md); drop --bf16"
    )


def train_steps(
    model,
    optimizer,
    blocks: TokenBlocks,
    config: TrainConfig,
    state: TrainState,
    *,
    checkpoint_path: Path,
    checkpoint_meta: dict,
    on_progress: Callable[[TrainProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    stopper: Stopper | None = None,
) -> TrainState:
    """Run from `state.step` to the last step, checkpointing as configured; returns the state.

    A `stopper` (started by the caller) scores the model at its intervals and after the last
    step, ends the run early once it is past its best, and its state travels in the
    checkpoints.

    Raises TrainingInterrupted when `should_stop` turns true (after checkpointing) and
    TrainingError when the loss stops being finite.
    """
    import torch

    from edgefed.train.loss import causal_lm_loss

    device = next(p for p in model.parameters() if p.requires_grad).device
    if config.bf16 and device.type == "cpu" and not cpu_has_bf16_matmul():
        warn_emulated_bf16()
    trainable = [p for p in model.parameters() if p.requires_grad]
    total = config.total_steps(blocks.count)
    warmup_steps = math.ceil(config.warmup * total)
    order = BatchOrder(blocks.count, config.batch_size, config.seed)
    session_tokens, session_start = 0, time.perf_counter()

    def checkpoint() -> None:
        meta = checkpoint_meta | {
            "tokens_seen": state.tokens_seen,
            "seconds": state.seconds,
            "loss_curve": state.loss_curve,
        }
        extra = None
        if stopper is not None:
            meta["stopper"], extra = stopper.state()
        save_checkpoint(
            checkpoint_path,
            Checkpoint(
                step=state.step,
                lora=lora_state(model),
                optimizer=optimizer.state_dict(),
                rng_state=torch.get_rng_state(),
                meta=meta,
                cuda_rng_state=torch.cuda.get_rng_state() if device.type == "cuda" else None,
                extra=extra,
            ),
        )

    model.train()
    while state.step < total:
        if should_stop is not None and should_stop():
            checkpoint()
            raise TrainingInterrupted(state.step, total, checkpoint_path)
        step_start = time.perf_counter()
        micro = [
            blocks.tokens[order.micro_batch(state.step * config.grad_accum + k)]
            for k in range(config.grad_accum)
        ]
        counts = [int((mb[:, 1:] != PAD).sum()) for mb in micro]
        step_tokens = sum(counts)
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for tokens, count in zip(micro, counts, strict=True):
            if count == 0:
                continue
            input_ids, attention_mask, labels = _batch_tensors(tokens, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
                loss = causal_lm_loss(model, input_ids, attention_mask, labels)
            (loss * (count / step_tokens)).backward()
            step_loss += float(loss.detach()) * count / step_tokens
        if not math.isfinite(step_loss):
            raise TrainingError(
                f"training diverged at step {state.step + 1} (loss {step_loss})",
                "lower --lr, or raise --warmup",
            )
        torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        learning_rate = config.learning_rate * learning_rate_factor(state.step, total, warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
        optimizer.step()
        release_freed_memory()  # else the heap's retention grows step by step (edgefed.memory)

        state.step += 1
        state.tokens_seen += step_tokens
        state.seconds += time.perf_counter() - step_start
        state.loss_curve.append((state.step, round(step_loss, 6)))
        session_tokens += step_tokens
        if on_progress is not None:
            on_progress(
                TrainProgress(
                    step=state.step,
                    total_steps=total,
                    loss=step_loss,
                    learning_rate=learning_rate,
                    tokens_seen=state.tokens_seen,
                    tokens_per_second=session_tokens / (time.perf_counter() - session_start),
                )
            )
        if stopper is not None and stopper.due(state.step, total):
            stopper.observe(model, state.step)
            if stopper.past_its_best():
                break
        if state.step % config.checkpoint_every == 0 and state.step < total:
            checkpoint()
            crash_point("train-checkpoint")
    model.eval()
    return state
