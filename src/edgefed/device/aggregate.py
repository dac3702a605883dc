"""One device's aggregation for a round: its trust row over the verified peers, and the mix.

Reads the device's own adapter and the peers' adapters that `sync` verified into the workspace,
computes row i of W with the chosen scheme (llama.cpp for perplexity and prediction: the base
loaded once, every adapter loaded once and swapped), mixes, and writes into the round folder:

    rounds/<r>/aggregated/   the mixed adapter (PEFT folder: adapter_config.json + safetensors)
    rounds/<r>/trust.json    {"round", "scheme", "devices", "scores", "weights", "normalization",
                              "merge", "relative_error", "peers_used"}

Trust-validation text is this device's own split (the rule recorded by its training run), never
its test split: the text that picks the weights must not be the text that reports the result.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from edgefed.adapter import BASE_FINGERPRINT_KEY, LoraSpec, read_adapter_folder, save_lora_tensors
from edgefed.atomic import atomic_write_text
from edgefed.device.workspace import Workspace
from edgefed.errors import DataError
from edgefed.trust.merge import MERGES
from edgefed.trust.schemes import Normalization, TrustInputs, TrustRow, compute_trust

AGGREGATED_DIR = "aggregated"
TRUST_FILE = "trust.json"
RUNTIME_SCHEMES = ("perplexity", "prediction")
DEFAULT_VAL_TOKENS = 8192


@dataclass(frozen=True)
class AggregateResult:
    row: TrustRow
    relative_error: float
    adapter_dir: Path

    def as_dict(self) -> dict:
        return {
            "trust": self.row.as_dict(),
            "relative_error": self.relative_error,
            "adapter": str(self.adapter_dir),
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


def _validation_tokens(workspace: Workspace, own_adapter: Path, runtime, limit: int | None):
    from edgefed.documents import read_documents
    from edgefed.train.blocks import evaluation_stream, token_stream
    from edgefed.train.split import TRUST_VAL, SplitRule, split_documents

    candidates = [own_adapter / "split.json", own_adapter.parent / "split.json"]
    split_file = next((p for p in candidates if p.is_file()), candidates[0])
    rule = (
        SplitRule(**json.loads(split_file.read_text(encoding="utf-8"))["rule"])
        if split_file.is_file()
        else SplitRule()
    )
    documents = read_documents(workspace.config["data"])
    split = split_documents(documents.documents, rule)
    stream = token_stream(
        split[TRUST_VAL], lambda t: runtime.tokenize(t, add_bos=False), runtime.eos
    )
    return evaluation_stream(stream, runtime.bos, limit)


def aggregate_round(
    workspace: Workspace,
    round_number: int,
    own_adapter: str | os.PathLike[str],
    *,
    scheme: str = "perplexity",
    normalization: Normalization | None = None,
    merge: str = "factors",
    by_tokens: bool = False,
    runtime_quant: str | None = None,
    val_tokens: int | None = DEFAULT_VAL_TOKENS,
) -> AggregateResult:
    """Compute this device's trust row for the round and write the mixed adapter.

    Raises DataError for an unknown scheme or merge, or missing inputs (no reference text for
    prediction trust, no own adapter), and AdapterMismatchError for adapters that do not agree.
    """
    if merge not in MERGES:
        raise DataError(f"unknown merge '{merge}'", f"choose one of {', '.join(MERGES)}")
    normalization = normalization or Normalization()
    federation = workspace.federation
    spec = LoraSpec.from_dict(federation["lora"])
    own_path = Path(own_adapter)
    _, own_tensors, _ = read_adapter_folder(own_path)
    peers, peer_tokens = _peer_adapters(workspace, round_number)
    me = workspace.device
    adapters = {me: {n: t.float() for n, t in own_tensors.items()}} | peers
    train_tokens = peer_tokens
    own_metrics = own_path / "metrics.json"
    if own_metrics.is_file():
        train_tokens = train_tokens | {
            me: json.loads(own_metrics.read_text(encoding="utf-8"))["tokens_seen"]
        }
    options = {"by_tokens": by_tokens} if scheme == "fedavg" else {}

    if scheme in RUNTIME_SCHEMES:
        row = _runtime_row(
            workspace, scheme, adapters, spec, own_path, normalization, runtime_quant, val_tokens
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
    record = {
        "round": round_number,
        **row.as_dict(),
        "normalization": asdict(normalization),
        "merge": merge,
        "relative_error": result.relative_error,
        "peers_used": [
            d for d, w in zip(row.devices, row.weights, strict=True) if w > 0 and d != me
        ],
    }
    atomic_write_text(
        workspace.round_dir(round_number) / TRUST_FILE, json.dumps(record, indent=1) + "\n"
    )
    return AggregateResult(row=row, relative_error=result.relative_error, adapter_dir=adapter_dir)


def _runtime_row(
    workspace, scheme, adapters, spec, own_path, normalization, runtime_quant, val_tokens
):
    from edgefed.quant.lora_gguf import convert_lora_to_gguf
    from edgefed.runtime import DEFAULT_RUNTIME_QUANT, LlamaRuntime, runtime_copy

    base = Path(workspace.config["base"])
    reference_path = workspace.root / "reference.txt"
    if scheme == "prediction" and not reference_path.is_file():
        raise DataError(
            "prediction trust needs the federation's reference text, and it has none",
            "use --trust perplexity, or a federation made with `edgefed init --reference FILE`",
        )
    with (
        tempfile.TemporaryDirectory(prefix=".gguf-", dir=workspace.root) as scratch,
        LlamaRuntime(runtime_copy(base, runtime_quant or DEFAULT_RUNTIME_QUANT)) as runtime,
    ):
        loaded = {}
        for device, tensors in adapters.items():
            folder = save_lora_tensors(tensors, spec, Path(scratch) / device)
            gguf = convert_lora_to_gguf(folder, Path(scratch) / f"{device}.gguf", base=base)
            loaded[device] = runtime.load_adapter(gguf)
        inputs = TrustInputs(
            own=workspace.device,
            adapters=adapters,
            runtime=runtime,
            runtime_adapters=loaded,
            val_tokens=_validation_tokens(workspace, own_path, runtime, val_tokens)
            if scheme == "perplexity"
            else None,
            reference_tokens=runtime.tokenize(reference_path.read_text(encoding="utf-8"))
            if scheme == "prediction"
            else None,
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
