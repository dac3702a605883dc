"""The publish step: this device's adapter for a round, signed, into the store, exactly once.

Only three things ever leave a device: its registration (public key), its adapters (float16
or int8 LoRA tensors) and their signed manifests, which carry two figures of the training run
(its token count and its trust-validation perplexity) and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from edgefed.adapter import initial_tensors, read_adapter_folder
from edgefed.atomic import atomic_write_bytes
from edgefed.device.workspace import Workspace
from edgefed.errors import AdapterMismatchError, DataError, InputFileError
from edgefed.faults import crash_point
from edgefed.privacy import DpNoise, privatize
from edgefed.sync.layout import ROUNDS_PREFIX, adapter_key, manifest_key, publishes
from edgefed.sync.manifest import ENCODING_FP16, ENCODING_INT8, adapter_manifest, encode_document
from edgefed.sync.store import KeyExists, Store
from edgefed.sync.verify import encode_adapter
from edgefed.train.run_folder import RunFolder

logger = logging.getLogger(__name__)


def create_once(store: Store, key: str, data: bytes, signer=None) -> bool:
    """Create `key`; True also when it already holds exactly `data`: a write whose answer was
    lost and that the client retried (relay or S3) meets its own object, which is success."""
    try:
        store.create(key, data, signer=signer)
    except KeyExists:
        return store.read(key) == data
    return True


def _published_metrics(adapter: Path) -> tuple[int, dict]:
    """From a run folder's metrics.json: (training tokens, the manifest's metrics); (0, {}) for
    a bare PEFT folder, which has no run to report."""
    run = RunFolder(adapter)
    return run.read_metrics().published_metrics() if run.is_finished() else (0, {})


def _publishable(workspace: Workspace, adapter: str | os.PathLike[str]) -> tuple[dict, int, dict]:
    """An adapter folder's tensors, training tokens and metrics, checked to fit the federation;
    AdapterMismatchError for another base or LoRA shape."""
    federation = workspace.federation
    spec, tensors, trained_on = read_adapter_folder(adapter)
    if trained_on is not None and trained_on != federation.base_sha256:
        raise AdapterMismatchError(
            f"{adapter} was trained on another base", "train on the federation's base"
        )
    lora = federation.lora
    if (spec.rank, spec.targets) != (lora.rank, lora.targets):
        raise AdapterMismatchError(
            f"{adapter} has rank {spec.rank} on {','.join(spec.targets)}; the federation "
            f"uses rank {lora.rank} on {','.join(lora.targets)}",
            "train with the federation's LoRA configuration",
        )
    train_tokens, metrics = _published_metrics(Path(adapter))
    return tensors, train_tokens, metrics


def publish_adapter(
    store: Store,
    workspace: Workspace,
    round_number: int,
    adapter: str | os.PathLike[str],
    *,
    compress: bool = False,
    dp: DpNoise | None = None,
) -> bool:
    """Publish this device's adapter (a run folder or a PEFT folder) for a round; False when
    the round was already published (nothing is sent twice).

    `compress` sends int8 codes with per-row scales instead of float16: half the bytes, lossy.
    `dp` publishes a clipped and noised release instead (`edgefed.privacy`), without metrics.
    Raises AdapterMismatchError for an adapter of another base or LoRA shape.
    """
    tensors, train_tokens, metrics = _publishable(workspace, adapter)
    if dp is not None:
        tensors = _private_release(workspace, round_number, tensors, dp)
        metrics = {}  # the adapter's scores would leak what the noise hides
    encoding = ENCODING_INT8 if compress else ENCODING_FP16
    return _publish(store, workspace, round_number, tensors, train_tokens, metrics, encoding)


def _publish(
    store: Store,
    workspace: Workspace,
    round_number: int,
    tensors: dict,
    train_tokens: int,
    metrics: dict,
    encoding: str,
    version: int = 1,
) -> bool:
    """Sign and store one version of the round's adapter; False when it was there before."""
    federation = workspace.federation
    device, key = workspace.device, workspace.key()
    blob = encode_adapter(tensors, encoding)
    manifest = adapter_manifest(
        federation=federation.id,
        round_number=round_number,
        device=device,
        sha256=hashlib.sha256(blob).hexdigest(),
        size=len(blob),
        base_sha256=federation.base_sha256,
        train_tokens=train_tokens,
        metrics=metrics,
        key=key,
        encoding=encoding,
        version=version,
    )
    # blob first: a manifest never points at a blob that is not there yet. A blob already there
    # with these bytes is an interrupted publish of this same adapter, finished here; another
    # adapter published before is kept.
    if not create_once(store, adapter_key(round_number, device, version), blob, signer=key):
        return False
    crash_point("publish-blob")
    try:
        store.create(
            manifest_key(round_number, device, version), encode_document(manifest), signer=key
        )
    except KeyExists:
        return False  # published before (its manifest, whenever made, stays)
    return True


def republish_adapter(
    store: Store,
    workspace: Workspace,
    round_number: int,
    *,
    adapter: str | os.PathLike[str] | None = None,
    compress: bool = False,
) -> int:
    """Publish a signed replacement of this device's adapter for a round whose publish is
    damaged or lost: the next version (readers take the highest that verifies; nothing is
    overwritten), made from the same adapter the workspace published (the same noised release
    when the round was published with --dp-clip: a second draw would spend privacy twice), or
    from `adapter` for a round published by hand (`edgefed sync --adapter`). Returns the
    version. InputFileError when the workspace no longer holds the adapter."""
    run = workspace.train_run(round_number)
    release = workspace.release_path(round_number)
    private = workspace.read_round_record(round_number).steps.get("publish", {}).get("dp")
    if release.is_file():
        from safetensors.torch import load

        if adapter is not None:
            raise InputFileError(
                f"round {round_number} was published as a noised release (--dp-clip)",
                "repair it without --adapter: the same release is sent again",
            )
        tensors, metrics = load(release.read_bytes()), {}
        train_tokens = run.read_metrics().tokens_seen if run.is_finished() else 0
    elif private:
        raise InputFileError(
            f"round {round_number} was published as a noised release (--dp-clip) and "
            f"{release} is gone",
            "it cannot be repaired: sending the adapter again, or a new draw, would reveal "
            "more than the noise allowed; leave the round as it is",
        )
    elif adapter is not None:
        tensors, train_tokens, metrics = _publishable(workspace, adapter)
    elif run.is_finished():
        tensors, train_tokens, metrics = _publishable(workspace, run.root)
    else:
        raise InputFileError(
            f"{workspace.root} holds no trained adapter of round {round_number} to publish again",
            "give the adapter the round published with --adapter PATH",
        )
    # after every version with any half in the store: a half-published version is taken too
    taken = publishes(store.keys(f"{ROUNDS_PREFIX}{round_number}/"))
    version = max(taken.get(workspace.device, {}).get(round_number, {}), default=0) + 1
    encoding = ENCODING_INT8 if compress else ENCODING_FP16
    _publish(store, workspace, round_number, tensors, train_tokens, metrics, encoding, version)
    return version


def _private_release(workspace: Workspace, round_number: int, tensors: dict, dp: DpNoise) -> dict:
    """The round's noised release: drawn once and kept, so a resumed publish sends the same
    draw (a second draw of the same adapter would spend privacy twice)."""
    from safetensors.torch import load, save

    path = workspace.release_path(round_number)
    exact = hashlib.sha256(save({n: t.float().contiguous() for n, t in tensors.items()}))
    settings = json.dumps(dp.as_dict() | {"adapter_sha256": exact.hexdigest()}, sort_keys=True)
    if path.is_file():
        from safetensors import safe_open

        with safe_open(path, "pt") as handle:
            recorded = (handle.metadata() or {}).get("edgefed.dp")
        if recorded != settings:
            raise DataError(
                f"round {round_number} was already released from another adapter or with other "
                f"privacy settings ({recorded})",
                "publish this round's adapter with the same --dp-clip and --dp-noise",
            )
        return load(path.read_bytes())
    initial = initial_tensors(tensors, workspace.federation.lora.init_seed)
    released, norm = privatize(tensors, initial, dp)
    logger.info("round %d: change norm %.4g, clipped to %g, noise x%g", round_number, norm,
                dp.clip, dp.noise)  # fmt: skip
    atomic_write_bytes(path, save(released, metadata={"edgefed.dp": settings}))
    return released
