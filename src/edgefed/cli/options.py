"""Option help texts and shared option types: each option is described once, here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

BaseOption = Annotated[
    Path | None,
    typer.Option(
        "--base",
        help="GGUF base model. Default: the embedded SmolLM2-135M-Instruct (Q4_1).",
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
        "(q8_0 measured fastest at equal perplexity on the embedded base), or 'keep' to use "
        "the base file as it is.",
    ),
]

_TRUST = "Trust and mixing"
TrustOption = Annotated[
    str | None,
    typer.Option(
        "--trust",
        help="Trust scheme: perplexity (your adapters' loss on your trust-validation text), "
        "prediction (agreement on the federation's reference text), weights (ΔW cosine), "
        "fedavg, or local. Default: the federation's.",
        show_default=False,
        rich_help_panel=_TRUST,
    ),
]
TemperatureOption = Annotated[
    float | None,
    typer.Option(
        "--temperature",
        help="Softmax temperature over the scores (perplexity: nats of mean loss; lower is "
        "pickier). Default: the federation's, else the scheme's measured one (perplexity 0.01, "
        "prediction 0.1, weights 1).",
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

_PRIVACY = "Privacy noise (see README: what it does and does not guarantee)"
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


def dp_noise(clip: float | None, noise: float):
    """The privacy options as one value (None without --dp-clip); refuses --dp-noise alone."""
    from edgefed.errors import DataError
    from edgefed.privacy import DpNoise

    if clip is None:
        if noise:
            raise DataError("--dp-noise needs --dp-clip", "e.g. --dp-clip 1 --dp-noise 0.001")
        return None
    return DpNoise(clip=clip, noise=noise)


_TRAINING = "Training"
PrecisionOption = Annotated[
    str,
    typer.Option(
        "--precision",
        help="Training copy of the base: nf4 (QLoRA, 4-bit weights) or fp32 (the exact GGUF "
        "values: 8x the weight memory; on the small embedded base the better adapter for +5% "
        "peak memory, see README).",
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
LearningRateOption = Annotated[
    float, typer.Option("--lr", help="Peak learning rate (AdamW).", rich_help_panel=_TRAINING)
]
