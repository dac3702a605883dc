"""A device's membership of a federation: create one, join one, report on it.

Library functions over a `Store` and a `Workspace`; the CLI and the simulation call them. A
round's own steps are their own modules: `train`, `publish`, `pull`, `aggregate`, `evaluate`.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

from edgefed.adapter import LoraSpec
from edgefed.atomic import atomic_write_bytes
from edgefed.device.publish import create_once
from edgefed.device.workspace import DeviceConfig, Workspace, default_workspace
from edgefed.errors import (
    ConfigError,
    InputFileError,
    ModelFormatError,
    StoreError,
)
from edgefed.quant.gguf_file import read_base_info, resolve_base
from edgefed.sync.layout import (
    DEVICES_PREFIX,
    FEDERATION_KEY,
    REFERENCE_KEY,
    ROUNDS_PREFIX,
    check_device_name,
    device_key,
    manifest_key,
    parse_round_key,
)
from edgefed.sync.manifest import (
    Federation,
    encode_document,
    federation_manifest,
    now,
    parse_document,
    registration,
)
from edgefed.sync.signing import DeviceKey
from edgefed.sync.store import KeyMissing, Store
from edgefed.trust.settings import TrustSettings

DEFAULT_WARMUP_STEPS = 100
DEFAULT_ROUND_STEPS = 25
# how many rounds old a peer's adapter may be and still be mixed: 2 lets a device that misses
# a round (a laptop off for a day) count for its peers' next two rounds; not yet measured
# against other values (see README, Limits)
DEFAULT_MAX_STALENESS = 2


def read_federation(store: Store) -> Federation:
    """The store's federation manifest; StoreError when there is none or it is damaged."""
    try:
        data = store.read(FEDERATION_KEY)
    except KeyMissing as exc:
        raise StoreError(
            f"{store.url} holds no federation", "create one with `edgefed init STORE`"
        ) from exc
    what = f"{store.url}/{FEDERATION_KEY}"
    try:
        return Federation.from_document(parse_document(data, what), what)
    except ModelFormatError as exc:  # say it is the store's file
        raise StoreError(exc.problem, "the store's federation.json is damaged") from exc


def init_federation(
    store: Store,
    *,
    base: str | os.PathLike[str] | None = None,
    lora: LoraSpec | None = None,
    warmup_steps: int = DEFAULT_WARMUP_STEPS,
    round_steps: int = DEFAULT_ROUND_STEPS,
    max_staleness: int = DEFAULT_MAX_STALENESS,
    trust: TrustSettings | None = None,
    reference: str | os.PathLike[str] | None = None,
    federation_id: str | None = None,
) -> Federation:
    """Create a federation in an empty store; returns its manifest. `trust` sets the devices'
    default scheme and temperature (its other fields are each device's own choice).

    Raises StoreError when the store already holds one (it is never replaced).
    """
    if max_staleness < 0:
        raise ConfigError(
            f"max staleness {max_staleness} is negative", "give --max-staleness 0 or more"
        )
    info = read_base_info(resolve_base(base))
    reference_bytes = None
    if reference is not None:
        path = Path(reference)
        if not path.is_file():
            raise InputFileError(f"reference text {path} does not exist", "check the path")
        reference_bytes = path.read_bytes()
        try:
            reference_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputFileError(f"{path} is not UTF-8 text", "pass a text file") from exc
    manifest = federation_manifest(
        federation_id=federation_id or f"fed-{uuid.uuid4().hex[:12]}",
        base_info=info,
        lora=lora or LoraSpec(),
        warmup_steps=warmup_steps,
        round_steps=round_steps,
        max_staleness=max_staleness,
        trust=(trust or TrustSettings()).federation_default(),
        reference=reference_bytes,
    )
    if reference_bytes is not None and not create_once(store, REFERENCE_KEY, reference_bytes):
        raise StoreError(f"{store.url} already holds a federation", "use another store")
    if not create_once(store, FEDERATION_KEY, encode_document(manifest)):
        raise StoreError(
            f"{store.url} already holds a federation", "join it, or init another store"
        )
    return Federation.from_document(manifest)


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
    federation.check_base(info, "pass that base with --base")
    root = Path(workspace).expanduser() if workspace else default_workspace(federation.id, device)
    if (root / DeviceConfig.FILE).exists():
        raise InputFileError(
            f"{root} is already a device workspace", "use it, or another --workspace"
        )
    reference = None
    if federation.reference_sha256 is not None:
        reference = store.read(REFERENCE_KEY)
        if hashlib.sha256(reference).hexdigest() != federation.reference_sha256:
            raise StoreError(
                f"the reference text in {store.url} differs from the federation manifest's",
                "the store is damaged or tampered with; ask the federation's creator",
            )
    key = DeviceKey.generate()
    if not create_once(
        store, device_key(device), encode_document(registration(device, key)), signer=key
    ):
        raise StoreError(
            f"device name '{device}' is already registered in {store.url}",
            "choose another --device name",
        )
    root.mkdir(parents=True, exist_ok=True)
    joined = Workspace(root)
    key.save(joined.key_path)
    joined.pin_federation(federation)
    if reference is not None:
        atomic_write_bytes(joined.reference_path, reference)
    DeviceConfig(  # last: a folder with device.json is a complete workspace
        federation=federation.id,
        device=device,
        store=store.url,
        data=str(Path(data).resolve()),
        base=str(info.path),
        joined=now(),
    ).write(root / DeviceConfig.FILE)
    return joined


def check_ready(store: Store, workspace: Workspace) -> None:
    """Everything a round needs from outside the workspace, checked before any work: the store
    answers (and takes the token), holds this device's federation, has this device registered
    with the key in the workspace, and the device's data is readable. Raises StoreError,
    InputFileError or DataError with one line each."""
    federation = read_federation(store)
    pinned = workspace.federation
    if federation.id != pinned.id:
        raise StoreError(
            f"{store.url} holds federation {federation.id}, not {pinned.id} which "
            f"{workspace.device} joined",
            "check the store path or URL in the workspace's device.json",
        )
    me = workspace.device
    try:
        registered = parse_document(store.read(device_key(me)), device_key(me))
    except KeyMissing as exc:
        raise StoreError(
            f"{me} is not registered in {store.url}", "join the federation again"
        ) from exc
    except ModelFormatError as exc:
        raise StoreError(exc.problem, "the store's registration of this device is damaged") from exc
    if registered.get("public_key") != workspace.key().public_key:
        raise StoreError(
            f"{me} is registered in {store.url} with another key than the one in "
            f"{workspace.key_path}",
            "use the workspace that joined as this device",
        )
    from edgefed.documents import read_documents

    read_documents(workspace.config.data)


def federation_status(store: Store, workspace: Workspace) -> dict:
    """The federation, each device's latest published round, rejections, this device's metrics.

    This device's own manifest, when unreadable, reports no metrics rather than failing: the
    status is for finding out what is wrong.
    """
    federation = workspace.federation
    latest: dict[str, int] = {}
    for key in store.keys(ROUNDS_PREFIX):
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
            manifest = parse_document(store.read(manifest_key(latest[me], me)), "manifest")
            my_metrics = manifest.get("metrics")
        except (KeyMissing, ModelFormatError):
            my_metrics = None
    return {
        "federation": federation.id,
        "store": store.url,
        "device": me,
        "base": federation.document["base"],
        "lora": federation.document["lora"],
        "schedule": federation.document["schedule"],
        "current_round": max(latest.values(), default=-1),
        "devices": {d: {"latest_round": latest.get(d)} for d in devices},
        "rejected": [r for n in workspace.rounds() for r in workspace.rejections(n)],
        "last_metrics": my_metrics,
    }
