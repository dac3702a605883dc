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
from edgefed.device.workspace import (
    DeviceConfig,
    Workspace,
    default_workspace,
    remember_workspace,
)
from edgefed.documents import Documents
from edgefed.errors import (
    DataError,
    InputFileError,
    ModelFormatError,
    StoreError,
)
from edgefed.quant.gguf_file import embedded_base_path, read_base_info, resolve_base
from edgefed.sync.layout import (
    DEVICES_PREFIX,
    FEDERATION_KEY,
    REFERENCE_KEY,
    ROUNDS_PREFIX,
    adapter_key,
    check_device_name,
    departure_key,
    device_key,
    manifest_key,
    parse_round_key,
    publishes,
)
from edgefed.sync.manifest import (
    Federation,
    Schedule,
    departure,
    encode_document,
    federation_manifest,
    now,
    parse_document,
    registration,
)
from edgefed.sync.signing import DeviceKey
from edgefed.sync.store import KeyMissing, Store
from edgefed.trust.settings import TrustSettings

# how many rounds old a peer's adapter may be and still be mixed: 2 lets a device that misses
# a round (a laptop off for a day) count for its peers' next two rounds; not yet measured
# against other values (see docs/limits.md)
DEFAULT_MAX_STALENESS = 2
# how long a round waits by default for its peers' adapters of the round: long enough for
# devices started together to meet (a round of the embedded base trains in minutes), short
# enough that a device whose peers are offline goes on with their older work the same session
DEFAULT_WAIT_SECONDS = 300.0
# how long a round trains, in epochs of each device's own train split, capped in steps: a
# device with 10 documents and one with 500 both train a sensible amount, and training stops
# at its best validation point within it (docs/measurements/training.md)
DEFAULT_WARMUP_EPOCHS = 2.0
DEFAULT_ROUND_EPOCHS = 1.0
DEFAULT_MAX_STEPS = 200
DEFAULT_SCHEDULE = Schedule(
    warmup_epochs=DEFAULT_WARMUP_EPOCHS,
    round_epochs=DEFAULT_ROUND_EPOCHS,
    max_steps=DEFAULT_MAX_STEPS,
    max_staleness=DEFAULT_MAX_STALENESS,
    wait_seconds=DEFAULT_WAIT_SECONDS,
)


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
    schedule: Schedule = DEFAULT_SCHEDULE,
    trust: TrustSettings | None = None,
    reference: str | os.PathLike[str] | None = None,
    federation_id: str | None = None,
) -> Federation:
    """Create a federation in an empty store; returns its manifest. `schedule` says how long
    each round trains (each device's own `--epochs`/`--steps` may override it) and how rounds
    meet; `trust` sets the devices' default scheme and sharpness (its other fields are each
    device's own choice).

    Raises StoreError when the store already holds one (it is never replaced).
    """
    from edgefed.sync.folder import FolderStore

    if isinstance(store, FolderStore):  # a folder may hold the user's own files: not those
        store.check_empty()
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
        lora=(lora or LoraSpec()).for_architecture(info.architecture),
        schedule=schedule,
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
    federation.check_base(info, _base_fix(federation, given=base is not None))
    root = Path(workspace).expanduser() if workspace else default_workspace(federation.id, device)
    if (root / DeviceConfig.FILE).exists():
        raise InputFileError(
            f"{root} is already a device workspace", "use it, or another --workspace"
        )
    check_data(data)  # before the name is taken: a typo in --data must not burn it
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
    remember_workspace(joined.root)
    return joined


def _base_fix(federation, *, given: bool) -> str:
    """What to do when this device's base is not the federation's: where that base is the
    embedded one, every device already has it (a copy or requantization of it under --base
    is another file), so the fix is to leave --base out, not to find a path."""
    if given:
        try:
            if read_base_info(embedded_base_path()).fingerprint == federation.base_sha256:
                return "this federation runs on the embedded base: join without --base"
        except InputFileError:  # the embedded package is not installed
            pass
    return "pass the federation's base file with --base"


def check_data(path: str | os.PathLike[str]) -> Documents:
    """The device's documents, checked to be usable: the path exists, holds text, and splits
    into non-empty train, trust-validation and test parts. Raises InputFileError or DataError
    with one line each."""
    from edgefed.documents import read_documents
    from edgefed.train.split import SplitRule, split_documents

    documents = read_documents(path)
    split_documents(documents.documents, SplitRule())
    return documents


def check_registration(store: Store, workspace: Workspace) -> None:
    """StoreError unless the store answers (and takes the token), holds this device's
    federation, and has this device registered with the key in the workspace."""
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


def check_ready(store: Store, workspace: Workspace) -> Documents:
    """Everything a round needs from outside the workspace, checked before any work: the
    registration (`check_registration`), a store this device can write to, the device not
    departed, and its data readable and splitting. Returns the data's documents (the caller
    names the files it could not read). Raises StoreError, InputFileError or DataError with
    one line each."""
    check_registration(store, workspace)
    store.check_writable()
    me = workspace.device
    if workspace.config.left is not None:
        raise InputFileError(
            f"{me} left the federation on {workspace.config.left}",
            "join again under a new --device name to take part again",
        )
    try:
        return check_data(workspace.config.data)
    except (InputFileError, DataError) as exc:
        raise type(exc)(
            f"{me}'s data: {exc.problem}",
            "point the workspace at usable text with `edgefed device set --data PATH`",
        ) from exc


def leave_federation(store: Store, workspace: Workspace) -> bool:
    """Publish this device's signed departure, so its peers stop waiting for it, and mark the
    workspace; its adapters already published stay usable. False when it had left before."""
    from dataclasses import replace

    from edgefed.sync.verify import Verifier

    config = workspace.config
    if config.left is not None:
        return False
    last_round = max(publishes(store.keys(ROUNDS_PREFIX)).get(workspace.device, {}), default=None)
    notice = departure(workspace.federation.id, workspace.device, last_round, workspace.key())
    key = departure_key(workspace.device)
    if not create_once(store, key, encode_document(notice), signer=workspace.key()):
        # a notice from an interrupted leave: ours if it verifies with our key
        earlier = parse_document(store.read(key), key)
        verifier = Verifier(workspace.federation, {workspace.device: workspace.key().public_key})
        if not verifier.departed(workspace.device, encode_document(earlier)):
            raise StoreError(
                f"{store.url} holds a departure of {workspace.device} not signed by this device",
                "the store is damaged or tampered with; tell the federation's creator",
            )
    replace(config, left=now()).write(workspace.root / DeviceConfig.FILE)
    return True


def set_device(
    workspace: Workspace,
    *,
    data: str | os.PathLike[str] | None = None,
    store: Store | None = None,
) -> DeviceConfig:
    """Point the workspace at other data (checked like join's) or at the federation's store in
    another place (checked to hold this federation with this device registered); the new
    config, written only when everything checks."""
    from dataclasses import replace

    config = workspace.config
    if data is not None:
        check_data(data)
        config = replace(config, data=str(Path(data).resolve()))
    if store is not None:
        check_registration(store, workspace)
        config = replace(config, store=store.url)
    config.write(workspace.root / DeviceConfig.FILE)
    return config


def check_own_publishes(
    store: Store, workspace: Workspace, round_keys: list[str] | None = None
) -> dict[int, str]:
    """This device's published rounds that a peer would not accept, and why: each is checked
    as a peer checks it (the highest version that verifies counts). Rounds this device
    published (round.json says so) but the store has lost count as well. `round_keys`: the
    store's listing of rounds/, when the caller has it already."""
    from edgefed.sync.verify import Rejected, Verifier

    me = workspace.device
    verifier = Verifier(workspace.federation, {me: workspace.key().public_key})
    problems: dict[int, str] = {}
    keys = store.keys(ROUNDS_PREFIX) if round_keys is None else round_keys
    mine = publishes(keys).get(me, {})
    recorded = [r for r in workspace.rounds() if "publish" in workspace.read_round_record(r).steps]
    for number in sorted(set(mine) | set(recorded)):
        reasons = []
        whole = [v for v, complete in mine.get(number, {}).items() if complete]
        for version in reversed(whole):
            try:
                verifier.check(
                    number,
                    me,
                    store.read(manifest_key(number, me, version)),
                    store.read(adapter_key(number, me, version)),
                    version,
                )
                break
            except Rejected as exc:
                reasons.append(f"version {version}: {exc}")
            except KeyMissing:
                reasons.append(f"version {version}: gone from the store")
        else:
            problems[number] = "; ".join(reasons) or "not in the store (lost)"
    return problems


def federation_status(store: Store, workspace: Workspace) -> dict:
    """The federation, each device's latest published round and whether it left, this
    device's publishes that peers would refuse, rejections, this device's last metrics.

    This device's own manifest, when unreadable, reports no metrics rather than failing: the
    status is for finding out what is wrong.
    """
    from edgefed.device.pull import departed_peers, registered_keys
    from edgefed.sync.verify import Verifier

    federation = workspace.federation
    round_keys = store.keys(ROUNDS_PREFIX)
    latest: dict[str, int] = {}
    for key in round_keys:
        item = parse_round_key(key)
        if item is not None and item.is_manifest:
            latest[item.device] = max(latest.get(item.device, -1), item.round)
    keys, _ = registered_keys(store, workspace)
    departed = departed_peers(store, Verifier(federation, keys))
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
        "current_round": max(latest.values(), default=None),
        # None once it left: a departed device runs no more rounds
        "next_round": None if workspace.config.left is not None else workspace.next_round(),
        "devices": {d: {"latest_round": latest.get(d), "left": d in departed} for d in devices},
        "damaged_publishes": {
            str(r): why for r, why in check_own_publishes(store, workspace, round_keys).items()
        },
        "rejected": [r for n in workspace.rounds() for r in workspace.rejections(n)],
        "last_metrics": my_metrics,
    }
