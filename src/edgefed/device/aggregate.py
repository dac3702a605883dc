"""One device's aggregation for a round: its trust row over the verified peers, and the mix.

Reads the device's own adapter and the peers' adapters that `sync` verified into the workspace,
computes row i of W with the chosen scheme (llama.cpp for perplexity and prediction: the base
loaded once, every adapter loaded once and swapped), mixes, and writes into the round folder:

    rounds/<r>/aggregated/   the mixed adapter (PEFT folder: adapter_config.json + safetensors)
    rounds/<r>/aggregated.gguf   the same as a GGUF LoRA, for llama.cpp
    rounds/<r>/trust.json    {"round", "scheme", "devices", "scores", "weights", "normalization",
                              "merge", "relative_error", "delta_norms", "clip_norm",
                              "peers_used"}

Trust-validation text is this device's own split (the rule recorded by its training run), never
its test split: the text that picks the weights must not be the text that reports the result.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgefed.adapter import BASE_FINGERPRINT_KEY, LoraSpec, read_adapter_folder, save_lora_tensors
from edgefed.atomic import atomic_write_text
from edgefed.device.split_text import device_split_tokens
from edgefed.device.workspace import Workspace
from edgefed.errors import DataError
from edgefed.faults import crash_point
from edgefed.quant.lora_gguf import convert_lora_to_gguf
from edgefed.scoring import ScoreProgress
from edgefed.train.blocks import evaluation_stream
from edgefed.train.loaded_base import LoadedBase
from edgefed.train.split import TRUST_VAL
from edgefed.trust.clip import clip_peers
from edgefed.trust.merge import MERGES
from edgefed.trust.schemes import (
    DEFAULT_SCHEME,
    Normalization,
    TrustInputs,
    TrustRow,
    compute_trust,
    default_temperature,
)

AGGREGATED_DIR = "aggregated"
AGGREGATED_GGUF = "aggregated.gguf"
TRUST_FILE = "trust.json"
RUNTIME_SCHEMES = ("perplexity", "prediction")
DEFAULT_VAL_TOKENS = 8192


@dataclass(frozen=True)
class AggregateResult:
    row: TrustRow
    relative_error: float
    adapter_dir: Path
    gguf_adapter: Path

    def as_dict(self) -> dict:
        return {
            "trust": self.row.as_dict(),
            "relative_error": self.relative_error,
            "adapter": str(self.adapter_dir),
            "gguf": str(self.gguf_adapter),
        }


def _peer_adapters(workspace: Workspace, round_number: int) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    folder = workspace.round_dir(round_number) / "peers"
    tensors, tokens = {}, {}
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        tensors[path.stem] = {n: t.float() for n, t in load_file(path).items()}
        manifest = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        tokens[path.stem] = int(manifest.get("train_tokens", 0))
    return tensors, tokens


def aggregate_round(
    workspace: Workspace,
    round_number: int,
    own_adapter: str | os.PathLike[str],
    *,
    scheme: str | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    threshold: float | None = None,
    merge: str = "factors",
    by_tokens: bool = False,
    runtime_quant: str | None = None,
    val_tokens: int | None = DEFAULT_VAL_TOKENS,
    clip_norm: float | None = None,
    loaded: LoadedBase | None = None,
    threads: int | None = None,
    on_progress: Callable[[ScoreProgress], None] | None = None,
) -> AggregateResult:
    """Compute this device's trust row for the round and write the mixed adapter.

    `scheme` defaults to the federation's; `temperature` to the federation's for that scheme,
    else the scheme's measured default (`DEFAULT_TEMPERATURES`). Raises DataError
    for an unknown scheme or merge, a bad normalization, or missing inputs (no reference text
    for prediction trust, no own adapter), and AdapterMismatchError for adapters that do not
    agree. `clip_norm` bounds each peer's ΔW norm (`edgefed.trust.clip`). `loaded` scores over
    an already loaded base (the simulation's); `on_progress` gets the scoring's progress. A
    device without peers loads and scores nothing: its row is itself.
    """
    if merge not in MERGES:
        raise DataError(f"unknown merge '{merge}'", f"choose one of {', '.join(MERGES)}")
    federation = workspace.federation
    defaults = federation.get("trust") or {}
    scheme = scheme or defaults.get("scheme", DEFAULT_SCHEME)
    if temperature is None and scheme == defaults.get("scheme"):
        temperature = defaults.get("temperature")  # the federation's, for its own scheme
    normalization = Normalization(
        temperature=default_temperature(scheme) if temperature is None else float(temperature),
        top_k=top_k,
        threshold=threshold,
    )
    if clip_norm is not None and not clip_norm > 0:
        raise DataError(f"--clip-norm {clip_norm:g} must be positive", "e.g. --clip-norm 2")
    if normalization.temperature <= 0 or (top_k is not None and top_k < 1):
        raise DataError(
            "the temperature must be positive and top-k at least 1",
            "e.g. --temperature 0.05 --top-k 3",
        )
    spec = LoraSpec.from_dict(federation["lora"])
    own_path = Path(own_adapter)
    _, own_tensors, _ = read_adapter_folder(own_path)
    peers, peer_tokens = _peer_adapters(workspace, round_number)
    me = workspace.device
    adapters = {me: {n: t.float() for n, t in own_tensors.items()}} | peers
    adapters, norms = clip_peers(adapters, me, clip_norm)
    train_tokens = peer_tokens
    own_metrics = own_path / "metrics.json"
    if own_metrics.is_file():
        train_tokens = train_tokens | {
            me: json.loads(own_metrics.read_text(encoding="utf-8"))["tokens_seen"]
        }
    options = {"by_tokens": by_tokens} if scheme == "fedavg" else {}

    if scheme in RUNTIME_SCHEMES and len(adapters) > 1:
        with (
            nullcontext(loaded)
            if loaded is not None
            else LoadedBase(workspace.config["base"], runtime_quant=runtime_quant, threads=threads)
        ) as loaded:
            row = _runtime_row(
                workspace,
                scheme,
                adapters,
                spec,
                own_path,
                normalization,
                val_tokens,
                loaded,
                on_progress,
            )
    else:
        inputs = TrustInputs(own=me, adapters=adapters, train_tokens=train_tokens)
        row = compute_trust(scheme, inputs, normalization, **options)

    result = MERGES[merge]([adapters[d] for d in row.devices], row.weights)
    adapter_dir = save_lora_tensors(
        result.tensors,
        spec,
        workspace.round_dir(round_number) / AGGREGATED_DIR,
        metadata={BASE_FINGERPRINT_KEY: federation["base"]["sha256"]},
    )
    gguf_adapter = convert_lora_to_gguf(
        adapter_dir,
        workspace.round_dir(round_number) / AGGREGATED_GGUF,
        base=workspace.config["base"],
    )
    crash_point("aggregate-mix")
    record = {
        "round": round_number,
        **row.as_dict(),
        "normalization": asdict(normalization),
        "merge": merge,
        "relative_error": result.relative_error,
        "delta_norms": norms,
        "clip_norm": clip_norm,
        "peers_used": [
            d for d, w in zip(row.devices, row.weights, strict=True) if w > 0 and d != me
        ],
    }
    atomic_write_text(
        workspace.round_dir(round_number) / TRUST_FILE, json.dumps(record, indent=1) + "\n"
    )
    return AggregateResult(
        row=row,
        relative_error=result.relative_error,
        adapter_dir=adapter_dir,
        gguf_adapter=gguf_adapter,
    )


def _runtime_row(
    workspace, scheme, adapters, spec, own_path, normalization, val_tokens, loaded, on_progress
):
    reference_path = workspace.root / "reference.txt"
    if scheme == "prediction" and not reference_path.is_file():
        raise DataError(
            "prediction trust needs the federation's reference text, and it has none",
            "use --trust perplexity, or a federation made with `edgefed init --reference FILE`",
        )
    runtime = loaded.runtime
    inputs = TrustInputs(
        own=workspace.device,
        adapters=adapters,
        runtime=runtime,
        runtime_adapters={d: loaded.load_tensors(t, spec) for d, t in adapters.items()},
        val_tokens=device_split_tokens(workspace, own_path, runtime, TRUST_VAL, val_tokens)
        if scheme == "perplexity"
        else None,
        reference_tokens=_reference_tokens(runtime, reference_path, val_tokens)
        if scheme == "prediction"
        else None,
        on_progress=on_progress,
    )
    return compute_trust(scheme, inputs, normalization)


def trust_history(workspace: Workspace) -> list[dict]:
    """Every trust row this device recorded, round by round."""
    rows = []
    for round_number in workspace.rounds():
        path = workspace.round_dir(round_number) / TRUST_FILE
        if path.is_file():
            rows.append(json.loads(path.read_text(encoding="utf-8")))
    return rows


def _reference_tokens(runtime, reference_path: Path, limit: int | None):
    """The first `limit` tokens of the federation's reference text: every device cuts the same
    prefix, so their predictions are compared on one text, at the trust budget's cost."""
    tokens = runtime.tokenize(reference_path.read_text(encoding="utf-8"), add_bos=False)
    return evaluation_stream(np.asarray(tokens, dtype=np.int32), runtime.bos, limit)
