"""The aggregate step: this device's trust row over the verified peers, and the mix.

Reads the device's own adapter and the peers' adapters that the pull step verified into the
workspace, computes row i of W with the chosen scheme (llama.cpp for perplexity and prediction:
the base loaded once, every adapter loaded once and swapped), mixes, and writes the mix (a PEFT
folder and its GGUF) and trust.json (`TrustRecord`) into the round folder.

Trust-validation text is this device's own split (the rule recorded by its training run), never
its test split: the text that picks the weights must not be the text that reports the result.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgefed.adapter import BASE_FINGERPRINT_KEY, read_adapter_folder, save_lora_tensors
from edgefed.atomic import remove_leftovers
from edgefed.device.records import TrustRecord
from edgefed.device.split_text import device_split_tokens, device_validation_halves
from edgefed.device.workspace import Workspace
from edgefed.errors import ConfigError, DataError
from edgefed.faults import crash_point
from edgefed.loaded_base import LoadedBase
from edgefed.quant.lora_gguf import convert_lora_to_gguf
from edgefed.scoring import ScoreProgress
from edgefed.train.blocks import evaluation_stream
from edgefed.train.run import DEFAULT_VAL_TOKENS
from edgefed.train.run_folder import RunFolder
from edgefed.train.split import TRUST_VAL
from edgefed.trust.clip import clip_peers
from edgefed.trust.merge import MERGES, merge_factors
from edgefed.trust.schemes import (
    TrustInputs,
    TrustRow,
    TrustScheme,
    compute_trust,
    trust_scheme,
)
from edgefed.trust.settings import TrustSettings


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


def _peer_adapters(workspace: Workspace, round_number: int) -> tuple[dict, dict, dict]:
    """Each peer's freshest verified adapter of rounds round-max_staleness..round in the
    workspace: its tensors, its training tokens, and the round it is from."""
    from safetensors.torch import load_file

    from edgefed.sync.manifest import parse_document

    staleness = workspace.federation.schedule.max_staleness
    tensors, tokens, rounds = {}, {}, {}
    for number in range(round_number, max(0, round_number - staleness) - 1, -1):
        folder = workspace.peers_dir(number)
        for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
            if path.stem in rounds:
                continue  # a fresher one is already taken
            tensors[path.stem] = {n: t.float() for n, t in load_file(path).items()}
            manifest_path = workspace.peer_manifest_path(number, path.stem)
            manifest = parse_document(manifest_path.read_bytes(), str(manifest_path))
            tokens[path.stem] = int(manifest.get("train_tokens", 0))
            rounds[path.stem] = number
    return tensors, tokens, rounds


def device_trust_settings(
    workspace: Workspace, trust: TrustSettings | None, *, mixtures_known: bool = False
) -> TrustSettings:
    """The settings this device mixes by: `trust` with the federation's defaults filled in.

    ConfigError for settings that cannot work here (a temperature in standard errors for a
    scheme without them; oracle trust, which needs the devices' data mixtures that only a
    simulation knows): commands call this before they train, so a round never trains and
    publishes only to fail at its mix.
    """
    default = TrustSettings.from_federation(workspace.federation.trust_default)
    settings = (trust or TrustSettings()).resolved(default)
    if trust_scheme(settings.scheme).needs_mixtures and not mixtures_known:
        raise ConfigError(
            f"{settings.scheme} trust needs every device's known data mixture, which only a "
            "simulation has",
            "choose another --trust",
        )
    return settings


def aggregate_round(
    workspace: Workspace,
    round_number: int,
    own_adapter: str | os.PathLike[str],
    loaded: LoadedBase,
    trust: TrustSettings | None = None,
    *,
    val_tokens: int | None = DEFAULT_VAL_TOKENS,
    mixtures: Mapping[str, Mapping[str, float]] | None = None,
    on_progress: Callable[[ScoreProgress], None] | None = None,
) -> AggregateResult:
    """Compute this device's trust row for the round and write the mixed adapter.

    Unset fields of `trust` are the federation's (`TrustSettings.resolved`). Raises DataError
    for missing inputs (no reference text for prediction trust, no own adapter) and
    AdapterMismatchError for adapters that do not agree. `on_progress` gets the scoring's
    progress. A device without peers scores nothing (and loads no runtime): its row is itself.
    """
    workspace.check_base(loaded)
    federation = workspace.federation
    settings = device_trust_settings(workspace, trust, mixtures_known=mixtures is not None)
    scheme = trust_scheme(settings.scheme)
    spec = federation.lora
    own_path = Path(own_adapter)
    _, own_tensors, _ = read_adapter_folder(own_path)
    peers, peer_tokens, peer_rounds = _peer_adapters(workspace, round_number)
    me = workspace.device
    adapters = {me: {n: t.float() for n, t in own_tensors.items()}} | peers
    adapters, norms = clip_peers(adapters, me, settings.clip_norm)
    train_tokens = peer_tokens
    own_run = RunFolder(own_path)
    if own_run.is_finished():
        train_tokens = train_tokens | {me: own_run.read_metrics().tokens_seen}

    if scheme.needs_runtime and len(adapters) > 1:
        row = _runtime_row(
            workspace, scheme, adapters, own_path, settings, val_tokens, loaded, on_progress
        )
    else:
        options = {"by_tokens": settings.by_tokens} if scheme.takes_by_tokens else {}
        inputs = TrustInputs(
            own=me, adapters=adapters, train_tokens=train_tokens, mixtures=mixtures
        )
        row = compute_trust(scheme.name, inputs, settings.normalization, **options)

    ordered = [adapters[d] for d in row.devices]
    if row.b_weights is not None:  # fedsa: A and B by their own rows, factor-wise by definition
        result = merge_factors(ordered, row.weights, row.b_weights)
    else:
        result = MERGES[settings.merge](ordered, row.weights)
    # a mix killed mid-write left its temporaries beside the outputs rewritten now
    outputs = (workspace.aggregated_dir(round_number), workspace.aggregated_gguf(round_number))
    remove_leftovers(workspace.round_dir(round_number), [path.name for path in outputs])
    adapter_dir = save_lora_tensors(
        result.tensors,
        spec,
        workspace.aggregated_dir(round_number),
        metadata={BASE_FINGERPRINT_KEY: federation.base_sha256},
    )
    gguf_adapter = convert_lora_to_gguf(
        adapter_dir, workspace.aggregated_gguf(round_number), base=loaded.base_path
    )
    crash_point("aggregate-mix")
    TrustRecord(
        round=round_number,
        scheme=row.scheme,
        devices=row.devices,
        scores=row.scores,
        weights=row.weights,
        errors=row.errors or [],
        normalization=asdict(settings.normalization),
        merge="factors" if row.b_weights is not None else settings.merge,
        relative_error=result.relative_error,
        delta_norms=norms,
        clip_norm=settings.clip_norm,
        peers_used=[d for d, w in zip(row.devices, row.weights, strict=True) if w > 0 and d != me],
        adapter_rounds={me: round_number} | dict(sorted(peer_rounds.items())),
        candidates=row.candidates or [],
        b_weights=row.b_weights or [],
    ).write(workspace.trust_path(round_number))
    return AggregateResult(
        row=row,
        relative_error=result.relative_error,
        adapter_dir=adapter_dir,
        gguf_adapter=gguf_adapter,
    )


def _runtime_row(
    workspace: Workspace,
    scheme: TrustScheme,
    adapters: dict,
    own_path: Path,
    settings: TrustSettings,
    val_tokens: int | None,
    loaded: LoadedBase,
    on_progress: Callable[[ScoreProgress], None] | None,
) -> TrustRow:
    reference_path = workspace.reference_path
    if scheme.needs_reference and not reference_path.is_file():
        raise DataError(
            f"{scheme.name} trust needs the federation's reference text, and it has none",
            "use --trust perplexity, or a federation made with `edgefed init --reference FILE`",
        )
    runtime = loaded.runtime
    spec = workspace.federation.lora
    validation = selection = load_mix = None
    if scheme.needs_selection_text:
        validation, selection = device_validation_halves(workspace, own_path, runtime, val_tokens)
        ordered = [adapters[workspace.device]] + [
            adapters[d] for d in sorted(adapters) if d != workspace.device
        ]

        def load_mix(weights: list[float]):
            return loaded.load_tensors(MERGES[settings.merge](ordered, weights).tensors, spec)

    elif scheme.needs_validation_text:
        validation = device_split_tokens(workspace, own_path, runtime, TRUST_VAL, val_tokens)
    inputs = TrustInputs(
        own=workspace.device,
        adapters=adapters,
        runtime=runtime,
        runtime_adapters={d: loaded.load_tensors(t, spec) for d, t in adapters.items()},
        val_tokens=validation,
        reference_tokens=_reference_tokens(runtime, reference_path, val_tokens)
        if scheme.needs_reference
        else None,
        on_progress=on_progress,
        selection_tokens=selection,
        load_mix=load_mix,
    )
    return compute_trust(scheme.name, inputs, settings.normalization)


def trust_history(workspace: Workspace) -> list[TrustRecord]:
    """Every trust row this device recorded, round by round."""
    records = (workspace.read_trust(r) for r in workspace.rounds())
    return [record for record in records if record is not None]


def _reference_tokens(runtime, reference_path: Path, limit: int | None):
    """The first `limit` tokens of the federation's reference text: every device cuts the same
    prefix, so their predictions are compared on one text, at the trust budget's cost."""
    tokens = runtime.tokenize(reference_path.read_text(encoding="utf-8"), add_bos=False)
    return evaluation_stream(np.asarray(tokens, dtype=np.int32), runtime.bos, limit)
