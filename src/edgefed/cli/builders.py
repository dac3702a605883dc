"""The library's settings made from command-line options, in one place for every command.

Typer needs one function parameter per option, so a command's signature is long by nature;
what stays short is everything after it. A command hands its options here in groups (trust,
training, the base) and passes one settings value per concern on to the library, so the
mapping of an option to a field (`--lr` to `learning_rate`, `--keep-last` to
`stop_at_best=False`, `--trust` to `scheme`) is written once and `round`, `run`, `train`,
`simulate` and `aggregate` cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from os import PathLike

from edgefed.loaded_base import DEFAULT_DEVICE, DEFAULT_PRECISION, LoadedBase
from edgefed.runtime.quantize import DEFAULT_RUNTIME_QUANT
from edgefed.train.loop import TrainConfig
from edgefed.trust.settings import DEFAULT_MERGE, TrustSettings

_TRAIN_DEFAULTS = TrainConfig()


def trust_settings(
    *,
    trust: str | None = None,
    temperature: float | None = None,
    se_temperature: float | None = None,
    top_k: int | None = None,
    threshold: float | None = None,
    merge: str = DEFAULT_MERGE,
    by_tokens: bool = False,
    clip_norm: float | None = None,
) -> TrustSettings:
    """The trust options (`--trust`, `--temperature`, ... `--clip-norm`); unset ones are the
    federation's, resolved when the workspace is known."""
    return TrustSettings(
        scheme=trust,
        temperature=temperature,
        se_temperature=se_temperature,
        top_k=top_k,
        threshold=threshold,
        merge=merge,
        by_tokens=by_tokens,
        clip_norm=clip_norm,
    )


def train_config(
    *,
    seq_len: int = _TRAIN_DEFAULTS.seq_len,
    batch_size: int = _TRAIN_DEFAULTS.batch_size,
    lr: float = _TRAIN_DEFAULTS.learning_rate,
    bf16: bool = _TRAIN_DEFAULTS.bf16,
    gradient_checkpointing: bool = _TRAIN_DEFAULTS.gradient_checkpointing,
    steps: int | None = None,
    epochs: float | None = None,
    keep_last: bool = False,
    seed: int = _TRAIN_DEFAULTS.seed,
    checkpoint_every: int = _TRAIN_DEFAULTS.checkpoint_every,
    grad_accum: int = _TRAIN_DEFAULTS.grad_accum,
    warmup: float = _TRAIN_DEFAULTS.warmup,
    weight_decay: float = _TRAIN_DEFAULTS.weight_decay,
    max_grad_norm: float = _TRAIN_DEFAULTS.max_grad_norm,
) -> TrainConfig:
    """The training options; those a command does not offer keep TrainConfig's defaults.
    TrainConfig checks them (both --steps and --epochs, a batch of 0) with one clear line."""
    return TrainConfig(
        seq_len=seq_len,
        batch_size=batch_size,
        learning_rate=lr,
        bf16=bf16,
        gradient_checkpointing=gradient_checkpointing,
        steps=steps,
        epochs=epochs,
        stop_at_best=not keep_last,
        seed=seed,
        checkpoint_every=checkpoint_every,
        grad_accum=grad_accum,
        warmup=warmup,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
    )


@dataclass(frozen=True)
class BaseOptions:
    """How a command loads its base (`--precision`, `--device`, `--runtime-quant`,
    `--threads`); the base file itself comes from `--base` or the device's workspace.
    Commands that never train leave precision and device at their defaults: LoadedBase makes
    the training copy only when a step trains."""

    precision: str = DEFAULT_PRECISION
    device: str = DEFAULT_DEVICE
    runtime_quant: str = DEFAULT_RUNTIME_QUANT
    threads: int | None = None

    def load(self, base: str | PathLike[str] | None) -> LoadedBase:
        """A LoadedBase of `base` (None: $EDGEFED_BASE, else the embedded one) with these
        options; nothing heavy is read until a step uses it."""
        return LoadedBase(
            base,
            precision=self.precision,
            device=self.device,
            runtime_quant=self.runtime_quant,
            threads=self.threads,
        )
