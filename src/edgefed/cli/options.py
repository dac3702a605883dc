"""Option help texts and shared option types: each option is described once, here.

Defaults and the trust schemes' descriptions come from the library's own constants and
records, so the help cannot drift from what the code does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from edgefed.adapter import DEFAULT_TARGETS, LoraSpec
from edgefed.loaded_base import DEVICES, TRAIN_PRECISIONS
from edgefed.runtime.quantize import DEFAULT_RUNTIME_QUANT
from edgefed.trust.schemes import schemes_help, temperatures_help

LORA_DEFAULTS = LoraSpec()

StoreArgument = Annotated[
    str,
    typer.Argument(
        help="The federation store: a folder kept in step by a sync tool (Syncthing, Dropbox, "
        "NFS, a USB stick), an http(s):// relay URL, or s3://BUCKET/PREFIX (add "
        "?endpoint=http://HOST:PORT for MinIO, Ceph and other S3-compatible stores).",
        show_default=False,
    ),
]
WorkspaceOption = Annotated[
    Path | None,
    typer.Option(
        "--workspace",
        "-w",
        help="Device workspace. Default: $EDGEFED_WORKSPACE, else the only one this machine "
        "knows (`edgefed device list`).",
        show_default=False,
    ),
]
TokenFileOption = Annotated[
    Path | None,
    typer.Option(
        "--token-file",
        help="File holding the relay's bearer token (or set EDGEFED_TOKEN). Default: the "
        "token the workspace kept at join.",
        show_default=False,
    ),
]


def store_token(token_file: Path | None, workspace=None) -> str | None:
    """The relay token: --token-file's content, else $EDGEFED_TOKEN, else the one `workspace`
    kept at join, else none."""
    from edgefed.errors import InputFileError

    if token_file is not None:
        try:
            return token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise InputFileError(
                f"cannot read token file {token_file} ({exc})", "check the path"
            ) from exc
    from_environment = os.environ.get("EDGEFED_TOKEN") or None
    if from_environment is not None or workspace is None:
        return from_environment
    return workspace.saved_token()


BaseOption = Annotated[
    Path | None,
    typer.Option(
        "--base",
        help="GGUF base model. Default: $EDGEFED_BASE, else the embedded SmolLM2-135M-Instruct "
        "(Q4_1).",
        show_default=False,
    ),
]
AdapterChoiceOption = Annotated[
    str | None,
    typer.Option(
        "--adapter",
        "-a",
        help="Which model: 'aggregated' (the device's personalised mix; the default), "
        "'local' (its own adapter, before mixing), 'base' (the bare base), or a GGUF LoRA "
        "file, PEFT adapter folder or `edgefed train` run folder (over --base, else the "
        "default device's base, else $EDGEFED_BASE or the embedded one).",
        show_default=False,
    ),
]
ModelRoundOption = Annotated[
    int | None,
    typer.Option(
        "--round",
        "-r",
        help="The device's round whose adapter to use. Default: the latest that has one.",
        min=0,
        show_default=False,
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Write one JSON document to stdout instead of a table.")
]
ThreadsOption = Annotated[
    int | None,
    typer.Option(
        "--threads", help="CPU threads (llama.cpp and PyTorch). Default: all cores.", min=1
    ),
]
WindowOption = Annotated[
    int,
    typer.Option("--window", help="Tokens per evaluation window (the context size).", min=2),
]
StrideOption = Annotated[
    int | None,
    typer.Option(
        "--stride",
        help="New tokens scored per window after the first; each keeps window-stride tokens "
        "of context. Default: window/2.",
        min=1,
    ),
]
RuntimeQuantOption = Annotated[
    str,
    typer.Option(
        "--runtime-quant",
        help="Quant type llama.cpp evaluates with: a cached copy of the base is made once "
        f"({DEFAULT_RUNTIME_QUANT} measured fastest at equal perplexity on the embedded base), "
        "or 'keep' to use "
        "the base file as it is.",
    ),
]

_SYNC = "Sync"
MinPeersOption = Annotated[
    int | None,
    typer.Option(
        "--min-peers",
        help="Stop waiting once this many peers have published the round. Default: every "
        "peer taking part (registered and not left).",
        min=0,
        show_default=False,
        rich_help_panel=_SYNC,
    ),
]
WaitOption = Annotated[
    float | None,
    typer.Option(
        "--wait",
        help="Wait at most this many seconds for the peers' adapters of the round; who is "
        "late is mixed from an older round, or next time. Default: the federation's "
        "(`edgefed init --wait`).",
        min=0,
        show_default=False,
        rich_help_panel=_SYNC,
    ),
]

_TRUST = "Trust and mixing"
TrustOption = Annotated[
    str | None,
    typer.Option(
        "--trust",
        help=f"Trust scheme: {schemes_help()}. Default: the federation's.",
        show_default=False,
        rich_help_panel=_TRUST,
    ),
]
TemperatureOption = Annotated[
    float | None,
    typer.Option(
        "--temperature",
        help="Softmax temperature over the scores (perplexity: nats of mean loss; lower is "
        "pickier). Default: the federation's, else the scheme's measured one "
        f"({temperatures_help()}).",
        show_default=False,
        rich_help_panel=_TRUST,
    ),
]
SeTemperatureOption = Annotated[
    float | None,
    typer.Option(
        "--se-temperature",
        help="Softmax temperature in standard errors instead: each peer's score difference to "
        "yours is divided by its measured standard error (paired, per token), so noise cannot "
        "make a row one-hot and a clear difference still can (perplexity, prediction). "
        "Perplexity's default is 3; 1 is sharper, measured better with about 60 documents per "
        "device and one epoch, worse after several epochs on a few documents.",
        show_default=False,
        rich_help_panel=_TRUST,
    ),
]
TopKOption = Annotated[
    int | None,
    typer.Option(
        "--top-k",
        help="Keep only the K most trusted (yourself always kept).",
        min=1,
        rich_help_panel=_TRUST,
    ),
]
ThresholdOption = Annotated[
    float | None,
    typer.Option(
        "--threshold", help="Drop scores below T (yourself always kept).", rich_help_panel=_TRUST
    ),
]
MergeOption = Annotated[
    str,
    typer.Option(
        "--merge",
        help="factors (average A and B, as the paper) or exact (Σ w·B·A, then an SVD back to "
        "rank r).",
        rich_help_panel=_TRUST,
    ),
]
ByTokensOption = Annotated[
    bool,
    typer.Option(
        "--by-tokens",
        help="fedavg: weight by training tokens instead of uniformly.",
        rich_help_panel=_TRUST,
    ),
]
ClipNormOption = Annotated[
    float | None,
    typer.Option(
        "--clip-norm",
        help="Rescale every peer's adapter whose ‖ΔW‖ (all modules, Frobenius) exceeds this "
        "bound onto it before trust and mixing; a defence against peers that publish huge "
        "updates. trust.json lists every norm. Default: no clipping.",
        show_default=False,
        rich_help_panel=_TRUST,
    ),
]

_PRIVACY = (
    "Privacy noise (see docs/guides/privacy-and-poisoned-peers.md: what it does and does not "
    "guarantee)"
)
DpClipOption = Annotated[
    float | None,
    typer.Option(
        "--dp-clip",
        help="Clip the published adapter's change from the shared initial adapter to this L2 "
        "norm (all tensors), then add --dp-noise. Default: publish the exact adapter.",
        show_default=False,
        rich_help_panel=_PRIVACY,
    ),
]
DpNoiseOption = Annotated[
    float,
    typer.Option(
        "--dp-noise",
        help="Gaussian noise multiplier z: every published coordinate gets noise of std "
        "z x --dp-clip. Prints the resulting (ε, δ=1e-5) per round.",
        min=0,
        rich_help_panel=_PRIVACY,
    ),
]


RoundTestTokensOption = Annotated[
    int,
    typer.Option(
        "--test-tokens", help="Test-split tokens scored by the evaluation (0: all).", min=0
    ),
]


def dp_noise(clip: float | None, noise: float):
    """The privacy options as one value (None without --dp-clip); refuses --dp-noise alone."""
    from edgefed.errors import ConfigError
    from edgefed.privacy import DpNoise

    if clip is None:
        if noise:
            raise ConfigError("--dp-noise needs --dp-clip", "e.g. --dp-clip 1 --dp-noise 0.001")
        return None
    return DpNoise(clip=clip, noise=noise)


CompressOption = Annotated[
    bool,
    typer.Option(
        help="Publish int8 codes instead of float16 (half the bytes, lossy).",
        rich_help_panel=_SYNC,
    ),
]

_TRAINING = "Training"
RoundSeedOption = Annotated[
    int,
    typer.Option(
        "--seed", help="Seed of data order (plus the round number).", rich_help_panel=_TRAINING
    ),
]
CheckpointEveryOption = Annotated[
    int,
    typer.Option(
        "--checkpoint-every",
        help="Write a training checkpoint every N steps.",
        min=1,
        rich_help_panel=_TRAINING,
    ),
]
PrecisionOption = Annotated[
    str,
    typer.Option(
        "--precision",
        help=f"Training copy of the base ({', '.join(TRAIN_PRECISIONS)}): gguf keeps the GGUF's "
        "own quantized blocks and trains on exactly the weights llama.cpp runs (about the "
        "file's size in memory); nf4 re-quantizes to QLoRA's NF4 (bitsandbytes); fp32 is "
        "the dequantized reference (8x a 4-bit file's weight memory). See "
        "docs/concepts/training-copies.md.",
        rich_help_panel=_TRAINING,
    ),
]
SeqLenOption = Annotated[
    int,
    typer.Option("--seq-len", help="Tokens per training block.", min=2, rich_help_panel=_TRAINING),
]
BatchSizeOption = Annotated[
    int,
    typer.Option("--batch-size", help="Blocks per micro-batch.", min=1, rich_help_panel=_TRAINING),
]
Bf16Option = Annotated[
    bool,
    typer.Option(
        "--bf16",
        help="Train with bfloat16 matmuls (torch autocast; weights, adapter and optimizer stay "
        "float32): measured 1.4x faster on an x86 CPU with AVX-512 BF16 and 20x slower on an "
        "AVX2-only one (docs/measurements/training.md).",
        rich_help_panel=_TRAINING,
    ),
]
GradientCheckpointingOption = Annotated[
    bool,
    typer.Option(
        "--gradient-checkpointing/--no-gradient-checkpointing",
        help="Recompute each layer's activations in the backward pass instead of keeping them: "
        "the same adapter; a round on the embedded base peaked at 1.5 GiB with it and 4.3-4.6 "
        "without, training at 0.82x the speed (docs/measurements/memory.md). Turn it off where "
        "memory is plentiful.",
        rich_help_panel=_TRAINING,
    ),
]
StepsOption = Annotated[
    int | None,
    typer.Option(
        "--steps",
        help="Optimizer steps to train (instead of --epochs).",
        min=1,
        show_default=False,
        rich_help_panel=_TRAINING,
    ),
]
EpochsOption = Annotated[
    float | None,
    typer.Option(
        "--epochs",
        help="Passes over this device's own train split (instead of --steps). Default: "
        "one for `train`; the federation's schedule for a round.",
        min=0.001,
        show_default=False,
        rich_help_panel=_TRAINING,
    ),
]
KeepLastOption = Annotated[
    bool,
    typer.Option(
        "--keep-last",
        help="Keep the adapter of the last step instead of the best point on held-out "
        "validation tokens (scored about 8 times a run). The guard stays: an adapter worse "
        "than where training started, beyond noise, is never kept.",
        rich_help_panel=_TRAINING,
    ),
]
LearningRateOption = Annotated[
    float, typer.Option("--lr", help="Peak learning rate (AdamW).", rich_help_panel=_TRAINING)
]
DeviceOption = Annotated[
    str,
    typer.Option(
        "--device",
        help=f"Where PyTorch trains: {', '.join(DEVICES)} (auto: CUDA when present).",
        rich_help_panel=_TRAINING,
    ),
]

_LORA = "LoRA adapter"
RankOption = Annotated[int, typer.Option("--rank", help="LoRA rank.", min=1, rich_help_panel=_LORA)]
AlphaOption = Annotated[
    float, typer.Option("--alpha", help="LoRA alpha (scale = alpha/rank).", rich_help_panel=_LORA)
]
DropoutOption = Annotated[
    float, typer.Option("--dropout", help="LoRA dropout while training.", rich_help_panel=_LORA)
]
TargetsOption = Annotated[
    str,
    typer.Option("--targets", help="Comma-separated modules to adapt.", rich_help_panel=_LORA),
]
InitSeedOption = Annotated[
    int,
    typer.Option(
        "--init-seed",
        help="Seed of the initial adapter (A random, B zero): devices of one federation share "
        "it so their adapters are comparable.",
        rich_help_panel=_LORA,
    ),
]
DEFAULT_TARGETS_TEXT = ",".join(DEFAULT_TARGETS)
