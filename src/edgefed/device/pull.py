"""The pull step: every peer adapter of a round, verified, into the workspace.

Everything pulled goes through `Verifier` first; what fails is logged in rejected.json with its
reason and never used. Peers' keys are pinned on first sight (trust on first use).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from edgefed.atomic import atomic_write_bytes
from edgefed.device.workspace import Workspace
from edgefed.errors import ModelFormatError
from edgefed.sync.layout import (
    DEVICES_PREFIX,
    ROUNDS_PREFIX,
    adapter_key,
    manifest_key,
    parse_round_key,
)
from edgefed.sync.manifest import parse_document
from edgefed.sync.store import KeyMissing, Store
from edgefed.sync.verify import Rejected, Verifier, encode_adapter

logger = logging.getLogger(__name__)

DEFAULT_POLL_SECONDS = 2.0


@dataclass(frozen=True)
class PullReport:
    """What a pull found for one round."""

    round: int
    verified: list[str] = field(default_factory=list)  # peers whose adapter is in the workspace
    rejected: list[dict] = field(default_factory=list)
    waited_seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "round": self.round,
            "verified_peers": self.verified,
            "rejected": self.rejected,
            "waited_seconds": round(self.waited_seconds, 1),
        }


def registered_keys(store: Store, workspace: Workspace) -> tuple[dict[str, str], list[dict]]:
    """Peers' public keys from the store, pinned on first sight; changed keys are rejected.

    A registration that is not a valid document is a rejection of that device; a store that
    cannot be read (StoreError) is not a fact about any device and propagates.
    """
    pinned = workspace.pinned_peers()
    keys, problems = dict(pinned), []
    for key in store.keys(DEVICES_PREFIX):
        name = key.removeprefix(DEVICES_PREFIX).removesuffix(".json")
        try:
            document = parse_document(store.read(key), key)
        except KeyMissing:
            continue  # listed, then gone (an eventually consistent store): seen next time
        except ModelFormatError as exc:
            reason = exc.problem
        else:
            public_key = document.get("public_key")
            reason = (
                None
                if document.get("device") == name and isinstance(public_key, str)
                else "names another device"
            )
        if reason is not None:
            problems.append(
                {"device": name, "round": None, "reason": f"bad registration: {reason}"}
            )
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


def _pull_once(store: Store, workspace: Workspace, round_number: int) -> PullReport:
    keys, problems = registered_keys(store, workspace)
    verifier = Verifier(workspace.federation, keys)
    # one entry per (device, reason): a rejection seen at an earlier pull is not logged again
    rejected = {
        (r["device"], r["reason"]): r
        for r in workspace.rejections(round_number)
        + [p | {"round": round_number} for p in problems]
    }
    complete: dict[str, set[bool]] = {}
    for key in store.keys(f"{ROUNDS_PREFIX}{round_number}/"):
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
        atomic_write_bytes(workspace.peer_manifest_path(round_number, peer), manifest_bytes)
        verified.append(peer)
    ordered = [rejected[k] for k in sorted(rejected)]
    workspace.record_rejections(round_number, ordered)
    return PullReport(round=round_number, verified=verified, rejected=ordered)


def pull_round(
    store: Store,
    workspace: Workspace,
    round_number: int,
    *,
    min_peers: int = 0,
    wait_seconds: float = 0.0,
    poll_seconds: float = DEFAULT_POLL_SECONDS,
    on_wait: Callable[[int, float], None] | None = None,
) -> PullReport:
    """Verify and keep every peer adapter of the round not yet pulled; log what is rejected.

    Waits up to `wait_seconds` for at least `min_peers` verified peers, calling
    `on_wait(verified, seconds waited)` before each poll; a device that stays away does not
    block: the report lists whoever arrived.
    """
    started = time.monotonic()
    report = _pull_once(store, workspace, round_number)
    while len(report.verified) < min_peers and time.monotonic() - started < wait_seconds:
        if on_wait is not None:
            on_wait(len(report.verified), time.monotonic() - started)
        time.sleep(poll_seconds)
        report = _pull_once(store, workspace, round_number)
    return PullReport(
        round=round_number,
        verified=report.verified,
        rejected=report.rejected,
        waited_seconds=time.monotonic() - started,
    )
