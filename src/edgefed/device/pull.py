"""The pull step: every peer's freshest adapter for a round, verified, into the workspace.

Devices are not online at the same moment, so a round does not wait for everyone: for round r
each registered peer's freshest published adapter of rounds r-max_staleness..r (the
federation's `max_staleness`) is pulled into rounds/<its round>/peers/, and the aggregate step
mixes it. A peer late for round r is mixed with its round r-1 work now and its round r work by
whoever aggregates after it arrives; no device is left out for good. Everything pulled goes
through `Verifier` first; what fails is logged in rejected.json with its reason and never used
(an older adapter of that peer may be used instead). Peers' keys are pinned on first sight.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

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
    peer_rounds: dict[str, int] = field(default_factory=dict)  # peer -> round of its adapter
    rejected: list[dict] = field(default_factory=list)
    waited_seconds: float = 0.0

    @property
    def verified(self) -> list[str]:
        """The peers whose adapter is in the workspace, verified."""
        return sorted(self.peer_rounds)

    def as_dict(self) -> dict:
        return {
            "round": self.round,
            "verified_peers": self.verified,
            "peer_rounds": self.peer_rounds,
            "rejected": self.rejected,
            "waited_seconds": round(self.waited_seconds, 1),
        }

    def stale(self) -> dict[str, int]:
        """The peers mixed with an older round's adapter, and that round."""
        return {p: r for p, r in self.peer_rounds.items() if r != self.round}

    def fresh(self) -> list[str]:
        """The peers whose adapter of this very round is here: what a wait waits for."""
        return [p for p in self.verified if p not in self.stale()]


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
    federation = workspace.federation
    keys, problems = registered_keys(store, workspace)
    verifier = Verifier(federation, keys)
    oldest = max(0, round_number - federation.schedule.max_staleness)
    # one entry per (device, round, reason): a rejection seen at an earlier pull is not logged
    # again (registration problems carry the round pulled)
    rejected = {
        (r["device"], r["round"], r["reason"]): r
        for r in workspace.rejections(round_number)
        + [p | {"round": round_number} for p in problems]
    }
    complete: dict[str, dict[int, set[bool]]] = {}  # peer -> round -> {manifest?, adapter?}
    for number in range(round_number, oldest - 1, -1):
        for key in store.keys(f"{ROUNDS_PREFIX}{number}/"):
            item = parse_round_key(key)
            if item is not None and item.device != workspace.device:
                kinds = complete.setdefault(item.device, {}).setdefault(item.round, set())
                kinds.add(item.is_manifest)
    peer_rounds: dict[str, int] = {}
    for peer in sorted(complete):
        published = sorted(
            (n for n, k in complete[peer].items() if k == {True, False}), reverse=True
        )
        for number in published:  # the freshest that verifies
            if _pull_adapter(store, workspace, verifier, number, peer, rejected):
                peer_rounds[peer] = number
                break
    ordered = [rejected[k] for k in sorted(rejected)]
    workspace.record_rejections(round_number, ordered)
    return PullReport(round=round_number, peer_rounds=peer_rounds, rejected=ordered)


def _pull_adapter(
    store: Store,
    workspace: Workspace,
    verifier: Verifier,
    round_number: int,
    peer: str,
    rejected: dict,
) -> bool:
    """Whether the peer's adapter of the round is (now) in the workspace, verified."""
    destination = workspace.peer_adapter_path(round_number, peer)
    if destination.exists():
        return True
    try:
        manifest_bytes = store.read(manifest_key(round_number, peer))
        adapter_bytes = store.read(adapter_key(round_number, peer))
        verified_adapter = verifier.check(round_number, peer, manifest_bytes, adapter_bytes)
    except Rejected as reason:
        if (peer, round_number, str(reason)) not in rejected:
            logger.warning("rejected %s's adapter for round %d: %s", peer, round_number, reason)
            rejected[peer, round_number, str(reason)] = {
                "device": peer,
                "round": round_number,
                "reason": str(reason),
            }
        return False
    # kept as float16 whatever the wire encoding, so aggregation reads one format
    atomic_write_bytes(destination, encode_adapter(verified_adapter.tensors))
    atomic_write_bytes(workspace.peer_manifest_path(round_number, peer), manifest_bytes)
    return True


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

    Waits up to `wait_seconds` for at least `min_peers` peers' adapters of this round (older
    ones do not end the wait, they are what is used when it runs out), calling
    `on_wait(fresh peers, seconds waited)` before each poll; a device that stays away does not
    block: the report lists whoever arrived.
    """
    started = time.monotonic()
    report = _pull_once(store, workspace, round_number)
    while len(report.fresh()) < min_peers and time.monotonic() - started < wait_seconds:
        if on_wait is not None:
            on_wait(len(report.fresh()), time.monotonic() - started)
        time.sleep(poll_seconds)
        report = _pull_once(store, workspace, round_number)
    return replace(report, waited_seconds=time.monotonic() - started)
