"""A device's part in a federation: create one, join one, publish and pull a round, report.

Library functions over a `Store` and a `Workspace`; the CLI and the simulation call them. Only
three things ever leave a device: its registration (public key), its adapters (float16 LoRA
tensors) and their signed manifests. Everything pulled goes through `Verifier` first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from edgefed.adapter import LoraSpec, initial_tensors, read_adapter_folder
from edgefed.atomic import atomic_write_bytes
from edgefed.device.workspace import WORKSPACE_FORMAT, Workspace, default_workspace, write_json
from edgefed.errors import AdapterMismatchError, DataError, InputFileError, StoreError
from edgefed.faults import crash_point
from edgefed.privacy import DpNoise, privatize
from edgefed.quant.gguf_file import read_base_info, resolve_base
from edgefed.sync.layout import (
    DEVICES_PREFIX,
    FEDERATION_KEY,
    REFERENCE_KEY,
    adapter_key,
    check_device_name,
    device_key,
    manifest_key,
    parse_round_key,
)
from edgefed.sync.manifest import (
    ENCODING_FP16,
    ENCODING_INT8,
    adapter_manifest,
    encode_document,
    federation_manifest,
    now,
    parse_document,
    registration,
)
from edgefed.sync.signing import DeviceKey
from edgefed.sync.store import KeyExists, KeyMissing, Store
from edgefed.sync.verify import Rejected, Verifier, encode_adapter
from edgefed.trust.schemes import DEFAULT_SCHEME

logger = logging.getLogger(__name__)

DEFAULT_TRUST = {"scheme": DEFAULT_SCHEME}  # temperature: the scheme's default
RELEASE_FILE = "release.safetensors"  # rounds/<r>/: the noised adapter published with --dp-*


@dataclass(frozen=True)
class SyncReport:
    """What one sync did for one round."""

    round: int
    published: bool
    verified: list[str] = field(default_factory=list)  # peers whose adapter is in the workspace
    rejected: list[dict] = field(default_factory=list)
    waited_seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "round": self.round,
            "published": self.published,
            "verified_peers": self.verified,
            "rejected": self.rejected,
            "waited_seconds": round(self.waited_seconds, 1),
        }


def read_federation(store: Store) -> dict:
    """The store's federation manifest; StoreError when there is none or it is damaged."""
    try:
        data = store.read(FEDERATION_KEY)
    except KeyMissing:
        raise StoreError(
            f"{store.url} holds no federation", "create one with `edgefed init STORE`"
        ) from None
    try:
        return parse_document(data, f"{store.url}/{FEDERATION_KEY}")
    except Exception as exc:  # ModelFormatError: say it is the store's file
        raise StoreError(str(exc), "the store's federation.json is damaged") from None


def init_federation(
    store: Store,
    *,
    base: str | os.PathLike[str] | None = None,
    lora: LoraSpec | None = None,
    warmup_steps: int = 100,
    round_steps: int = 25,
    trust: Mapping | None = None,
    reference: str | os.PathLike[str] | None = None,
    federation_id: str | None = None,
) -> dict:
    """Create a federation in an empty store; returns its manifest.

    Raises StoreError when the store already holds one (it is never replaced).
    """
    info = read_base_info(resolve_base(base))
    reference_bytes = None
    if reference is not None:
        path = Path(reference)
        if not path.is_file():
            raise InputFileError(f"reference text {path} does not exist", "check the path")
        reference_bytes = path.read_bytes()
        try:
            reference_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise InputFileError(f"{path} is not UTF-8 text", "pass a text file") from None
    manifest = federation_manifest(
        federation_id=federation_id or f"fed-{uuid.uuid4().hex[:12]}",
        base_info=info,
        lora=lora or LoraSpec(),
        warmup_steps=warmup_steps,
        round_steps=round_steps,
        trust=trust or DEFAULT_TRUST,
        reference=reference_bytes,
    )
    if reference_bytes is not None and not _create_once(store, REFERENCE_KEY, reference_bytes):
        raise StoreError(f"{store.url} already holds a federation", "use another store")
    if not _create_once(store, FEDERATION_KEY, encode_document(manifest)):
        raise StoreError(
            f"{store.url} already holds a federation", "join it, or init another store"
        )
    return manifest


def _create_once(store: Store, key: str, data: bytes, signer: DeviceKey | None = None) -> bool:
    """Create `key`; True also when it already holds exactly `data`: a write whose answer was
    lost and that the client retried (relay or S3) meets its own object, which is success."""
    try:
        store.create(key, data, signer=signer)
    except KeyExists:
        return store.read(key) == data
    return True


def join_federation(
    store: Store,
    device: str,
    *,
    data: str | os.PathLike[str],
    workspace: str | os.PathLike[str] | None = None,
    base: str | os.PathLike[str] | None = None,
) -> Workspace:
    """Make this device's workspace and key, and register the public key in the store.

    Refuses (AdapterMismatchError) when the local base is not the federation's, and
    (StoreError) when another device already registered this name.
    """
    check_device_name(device)
    federation = read_federation(store)
    info = read_base_info(resolve_base(base))
    expected = federation["base"]
    if info.fingerprint != expected["sha256"]:
        raise AdapterMismatchError(
            f"this base ({info.path.name}, sha256 {info.fingerprint[:12]}) is not the "
            f"federation's: {expected['name'] or expected['architecture']}, sha256 "
            f"{expected['sha256'][:12]}",
            "pass that base with --base",
        )
    root = (
        Path(workspace).expanduser() if workspace else default_workspace(federation["id"], device)
    )
    if (root / "device.json").exists():
        raise InputFileError(
            f"{root} is already a device workspace", "use it, or another --workspace"
        )
    reference = None
    if federation.get("reference"):
        reference = store.read(REFERENCE_KEY)
        if hashlib.sha256(reference).hexdigest() != federation["reference"]["sha256"]:
            raise StoreError(
                f"the reference text in {store.url} differs from the federation manifest's",
                "the store is damaged or tampered with; ask the federation's creator",
            )
    key = DeviceKey.generate()
    if not _create_once(
        store, device_key(device), encode_document(registration(device, key)), signer=key
    ):
        raise StoreError(
            f"device name '{device}' is already registered in {store.url}",
            "choose another --device name",
        )
    root.mkdir(parents=True, exist_ok=True)
    key.save(root / "device.key")
    write_json(root / "federation.json", federation)
    if reference is not None:
        atomic_write_bytes(root / REFERENCE_KEY, reference)
    write_json(
        root / "device.json",
        {
            "format": WORKSPACE_FORMAT,
            "federation": federation["id"],
            "device": device,
            "store": store.url,
            "data": str(Path(data).resolve()),
            "base": str(info.path),
            "joined": now(),
        },
    )
    return Workspace(root)


def registered_keys(store: Store, workspace: Workspace) -> tuple[dict[str, str], list[dict]]:
    """Peers' public keys from the store, pinned on first sight; changed keys are rejected."""
    pinned = workspace.pinned_peers()
    keys, problems = dict(pinned), []
    for key in store.keys(DEVICES_PREFIX):
        name = key.removeprefix(DEVICES_PREFIX).removesuffix(".json")
        try:
            document = parse_document(store.read(key), key)
            public_key = document["public_key"]
            if document.get("device") != name or not isinstance(public_key, str):
                raise ValueError("names another device")
        except Exception as exc:
            problems.append({"device": name, "round": None, "reason": f"bad registration: {exc}"})
            continue
        if name in pinned and pinned[name] != public_key:
            problems.append(
                {"device": name, "round": None, "reason": "registered key changed since first seen"}
            )
            continue
        keys[name] = public_key
    if keys != pinned:
        workspace.pin_peers(keys)
    return keys, problems


def publish_metrics(run_dir: str | os.PathLike[str]) -> tuple[int, dict]:
    """Training tokens and the metrics a manifest carries, from a run folder's metrics.json.

    Only aggregate figures leave the device: the token count (for token-weighted FedAvg) and
    the trust-validation perplexity; (0, {}) for a bare PEFT folder.
    """
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        return 0, {}
    run = json.loads(path.read_text(encoding="utf-8"))
    return int(run.get("tokens_seen", 0)), {"val_perplexity": run.get("val", {}).get("perplexity")}


def publish_adapter(
    store: Store,
    workspace: Workspace,
    round_number: int,
    adapter: str | os.PathLike[str],
    *,
    train_tokens: int = 0,
    metrics: Mapping | None = None,
    compress: bool = False,
    dp: DpNoise | None = None,
) -> bool:
    """Publish this device's adapter for a round; False when it was already published.

    `compress` sends int8 codes with per-row scales instead of float16: half the bytes, lossy.
    `dp` publishes a clipped and noised release instead (`edgefed.privacy`), without metrics.
    """
    federation = workspace.federation
    spec, tensors, trained_on = read_adapter_folder(adapter)
    if trained_on is not None and trained_on != federation["base"]["sha256"]:
        raise AdapterMismatchError(
            f"{adapter} was trained on another base", "train on the federation's base"
        )
    if (spec.rank, spec.targets) != (
        federation["lora"]["rank"],
        tuple(federation["lora"]["targets"]),
    ):
        raise AdapterMismatchError(
            f"{adapter} has rank {spec.rank} on {','.join(spec.targets)}; the federation "
            f"uses rank {federation['lora']['rank']} on {','.join(federation['lora']['targets'])}",
            "train with the federation's LoRA configuration",
        )
    if dp is not None:
        tensors = _private_release(workspace, round_number, tensors, dp)
        metrics = {}  # the adapter's scores would leak what the noise hides
    device, key = workspace.device, workspace.key()
    encoding = ENCODING_INT8 if compress else ENCODING_FP16
    blob = encode_adapter(tensors, encoding)
    manifest = adapter_manifest(
        federation=federation["id"],
        round_number=round_number,
        device=device,
        sha256=hashlib.sha256(blob).hexdigest(),
        size=len(blob),
        base_sha256=federation["base"]["sha256"],
        train_tokens=train_tokens,
        metrics=metrics or {},
        key=key,
        encoding=encoding,
    )
    # blob first: a manifest never points at a blob that is not there yet. A blob already there
    # with these bytes is an interrupted publish of this same adapter, finished here; another
    # adapter published before is kept.
    if not _create_once(store, adapter_key(round_number, device), blob, signer=key):
        return False
    crash_point("publish-blob")
    try:
        store.create(manifest_key(round_number, device), encode_document(manifest), signer=key)
    except KeyExists:
        return False  # published before (its manifest, whenever made, stays)
    return True


def _private_release(workspace: Workspace, round_number: int, tensors: dict, dp: DpNoise) -> dict:
    """The round's noised release: drawn once and kept, so a resumed publish sends the same
    draw (a second draw of the same adapter would spend privacy twice)."""
    from safetensors.torch import load, save

    path = workspace.round_dir(round_number) / RELEASE_FILE
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
    initial = initial_tensors(tensors, int(workspace.federation["lora"]["init_seed"]))
    released, norm = privatize(tensors, initial, dp)
    logger.info("round %d: change norm %.4g, clipped to %g, noise x%g", round_number, norm,
                dp.clip, dp.noise)  # fmt: skip
    atomic_write_bytes(path, save(released, metadata={"edgefed.dp": settings}))
    return released


def pull_round(store: Store, workspace: Workspace, round_number: int) -> SyncReport:
    """Verify and keep every peer adapter of the round not yet pulled; log what is rejected."""
    federation = workspace.federation
    keys, problems = registered_keys(store, workspace)
    verifier = Verifier(federation, keys)
    # one entry per (device, reason): a rejection seen at an earlier sync is not logged again
    rejected = {
        (r["device"], r["reason"]): r
        for r in workspace.rejections(round_number)
        + [p | {"round": round_number} for p in problems]
    }
    complete: dict[str, set[bool]] = {}
    for key in store.keys(f"rounds/{round_number}/"):
        item = parse_round_key(key)
        if item is not None and item.device != workspace.device:
            complete.setdefault(item.device, set()).add(item.is_manifest)
    verified = []
    for peer in sorted(d for d, kinds in complete.items() if kinds == {True, False}):
        destination = workspace.peer_adapter_path(round_number, peer)
        if destination.exists():
            verified.append(peer)
            continue
        try:
            manifest_bytes = store.read(manifest_key(round_number, peer))
            adapter_bytes = store.read(adapter_key(round_number, peer))
            verified_adapter = verifier.check(round_number, peer, manifest_bytes, adapter_bytes)
        except Rejected as reason:
            if (peer, str(reason)) not in rejected:
                logger.warning("rejected %s's adapter for round %d: %s", peer, round_number, reason)
                rejected[peer, str(reason)] = {
                    "device": peer,
                    "round": round_number,
                    "reason": str(reason),
                }
            continue
        # kept as float16 whatever the wire encoding, so aggregation reads one format
        atomic_write_bytes(destination, encode_adapter(verified_adapter.tensors))
        atomic_write_bytes(destination.with_suffix(".json"), manifest_bytes)
        verified.append(peer)
    ordered = [rejected[k] for k in sorted(rejected)]
    workspace.record_rejections(round_number, ordered)
    return SyncReport(round=round_number, published=False, verified=verified, rejected=ordered)


def sync_round(
    store: Store,
    workspace: Workspace,
    round_number: int,
    *,
    adapter: str | os.PathLike[str] | None = None,
    train_tokens: int = 0,
    metrics: Mapping | None = None,
    compress: bool = False,
    dp: DpNoise | None = None,
    min_peers: int = 0,
    wait_seconds: float = 0.0,
    poll_seconds: float = 2.0,
    on_wait: Callable[[int, float], None] | None = None,
) -> SyncReport:
    """Publish this device's adapter for the round (if given) and pull the peers' adapters.

    Waits up to `wait_seconds` for at least `min_peers` verified peers; a device that stays
    away does not block: the report lists whoever arrived.
    """
    published = False
    if adapter is not None:
        published = publish_adapter(
            store,
            workspace,
            round_number,
            adapter,
            train_tokens=train_tokens,
            metrics=metrics,
            compress=compress,
            dp=dp,
        )
    started = time.monotonic()
    report = pull_round(store, workspace, round_number)
    while len(report.verified) < min_peers and time.monotonic() - started < wait_seconds:
        if on_wait is not None:
            on_wait(len(report.verified), time.monotonic() - started)
        time.sleep(poll_seconds)
        report = pull_round(store, workspace, round_number)
    return SyncReport(
        round=round_number,
        published=published,
        verified=report.verified,
        rejected=report.rejected,
        waited_seconds=time.monotonic() - started,
    )


def federation_status(store: Store, workspace: Workspace) -> dict:
    """The federation, each device's latest published round, rejections, this device's metrics."""
    federation = workspace.federation
    latest: dict[str, int] = {}
    for key in store.keys("rounds/"):
        item = parse_round_key(key)
        if item is not None and item.is_manifest:
            latest[item.device] = max(latest.get(item.device, -1), item.round)
    devices = sorted(
        k.removeprefix(DEVICES_PREFIX).removesuffix(".json") for k in store.keys(DEVICES_PREFIX)
    )
    me = workspace.device
    my_metrics = None
    if me in latest:
        try:
            my_metrics = parse_document(store.read(manifest_key(latest[me], me)), "manifest")[
                "metrics"
            ]
        except Exception:  # our own manifest unreadable: report no metrics rather than fail
            my_metrics = None
    return {
        "federation": federation["id"],
        "store": store.url,
        "device": me,
        "base": federation["base"],
        "lora": federation["lora"],
        "schedule": federation["schedule"],
        "current_round": max(latest.values(), default=-1),
        "devices": {d: {"latest_round": latest.get(d)} for d in devices},
        "rejected": [r for n in workspace.rounds() for r in workspace.rejections(n)],
        "last_metrics": my_metrics,
    }
