"""The pull step: every peer's freshest adapter for a round, verified, into the workspace.

Devices are not online at the same moment, so a round does not wait for everyone for ever: for
round r each registered peer's freshest published adapter of rounds r-max_staleness..r (the
federation's `max_staleness`) is pulled into rounds/<its round>/peers/, and the aggregate step
mixes it. A peer late for round r is mixed with its round r-1 work now and its round r work by
whoever aggregates after it arrives; no device is left out for good. Everything pulled goes
through `Verifier` first; what fails is logged in rejected.json with its reason and never used
(an older adapter of that peer may be used instead). Peers' keys are pinned on first sight.

A round waits (up to the federation's `wait_seconds`, unless told otherwise) for every peer
still taking part: registered, and not departed by its own signed notice. A store that stops
answering inside the wait (`StoreUnreachable`) is polled again with backoff until the wait
ends: a relay restarted or a Wi-Fi that drops must not cost a device its round. Of a round's
versions (a replacement publish) the highest that verifies is used.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from edgefed.atomic import atomic_write_bytes
from edgefed.device.workspace import Workspace
from edgefed.errors import ModelFormatError
from edgefed.sync.layout import (
    DEPARTURES_PREFIX,
    DEVICES_PREFIX,
    ROUNDS_PREFIX,
    adapter_key,
    manifest_key,
    parse_departure_key,
    publishes,
)
from edgefed.sync.manifest import parse_document
from edgefed.sync.store import KeyMissing, Store, StoreUnreachable
from edgefed.sync.verify import Rejected, Verifier, encode_adapter

logger = logging.getLogger(__name__)

DEFAULT_POLL_SECONDS = 2.0
MAX_BACKOFF_SECONDS = 30.0  # between polls of a store that does not answer


class WaitInterrupted(Exception):
    """The wait for peers was stopped on request (Ctrl-C); nothing is recorded, so the same
    command waits again where it stopped. Not an error: outside the `EdgefedError` tree."""


@dataclass(frozen=True)
class PullReport:
    """What a pull found for one round."""

    round: int
    peer_rounds: dict[str, int] = field(default_factory=dict)  # peer -> round of its adapter
    rejected: list[dict] = field(default_factory=list)
    awaited: tuple[str, ...] = ()  # registered peers taking part: not departed, not far behind
    departed: tuple[str, ...] = ()  # peers that left by their own signed notice
    waited_seconds: float = 0.0
    outage: str | None = None  # the store's problem at the last poll, ridden out

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
            "awaited": list(self.awaited),
            "missing": self.missing(),
            "departed": list(self.departed),
            "waited_seconds": round(self.waited_seconds, 1),
            "outage": self.outage,
        }

    def stale(self) -> dict[str, int]:
        """The peers mixed with an older round's adapter, and that round."""
        return {p: r for p, r in self.peer_rounds.items() if r != self.round}

    def fresh(self) -> list[str]:
        """The peers whose adapter of this very round is here: what a wait waits for."""
        return [p for p in self.verified if p not in self.stale()]

    def missing(self) -> list[str]:
        """The peers taking part whose adapter of this round is not here (yet)."""
        return [p for p in self.awaited if p not in self.fresh()]

    def complete(self, min_peers: int | None) -> bool:
        """Whether a wait for `min_peers` fresh peers (None: every peer taking part) is over."""
        return not self.missing() if min_peers is None else len(self.fresh()) >= min_peers


@dataclass(frozen=True)
class WaitState:
    """Where a wait for peers stands, for a live display."""

    round: int
    fresh: list[str]  # published this round, verified
    missing: list[str]  # awaited, not yet here
    seconds_left: float
    outage: str | None  # the store's problem, when it did not answer the last poll


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


def departed_peers(store: Store, verifier: Verifier) -> list[str]:
    """The devices whose signed departure notice is in the store (only a device's own key can
    make its peers stop waiting for it)."""
    departed = []
    for key in store.keys(DEPARTURES_PREFIX):
        device = parse_departure_key(key)
        try:
            notice = store.read(key)
        except KeyMissing:
            continue
        if device is not None and verifier.departed(device, notice):
            departed.append(device)
    return sorted(departed)


def _pull_once(store: Store, workspace: Workspace, round_number: int) -> PullReport:
    federation = workspace.federation
    keys, problems = registered_keys(store, workspace)
    verifier = Verifier(federation, keys)
    departed = departed_peers(store, verifier)
    oldest = max(0, round_number - federation.schedule.max_staleness)
    # one entry per (device, round, reason): a rejection seen at an earlier pull is not logged
    # again (registration problems carry the round pulled)
    rejected = {
        (r["device"], r["round"], r["reason"]): r
        for r in workspace.rejections(round_number)
        + [p | {"round": round_number} for p in problems]
    }
    me = workspace.device
    window = publishes(
        key
        for number in range(oldest, round_number + 1)
        for key in store.keys(f"{ROUNDS_PREFIX}{number}/")
    )
    window.pop(me, None)
    peer_rounds: dict[str, int] = {}
    for peer, rounds in window.items():
        published = sorted(
            ((n, v) for n, versions in rounds.items() for v, whole in versions.items() if whole),
            reverse=True,
        )
        for number, version in published:  # the freshest round, its highest version, verified
            if _pull_adapter(store, workspace, verifier, (number, version), peer, rejected):
                peer_rounds[peer] = number
                break
    ordered = [rejected[k] for k in sorted(rejected)]
    workspace.record_rejections(round_number, ordered)
    return PullReport(
        round=round_number,
        peer_rounds=peer_rounds,
        rejected=ordered,
        # a peer with nothing in the window is more than max_staleness rounds behind (or new):
        # nothing it publishes soon is for this round, so it is not waited for
        awaited=tuple(
            p
            for p in sorted(keys)
            if p != me and p not in departed and (oldest == 0 or p in window)
        ),
        departed=tuple(p for p in departed if p != me),
    )


def _pulled_version(workspace: Workspace, round_number: int, peer: str) -> int:
    """The version of the peer's adapter already in the workspace (0: none)."""
    if not workspace.peer_adapter_path(round_number, peer).exists():
        return 0
    try:
        manifest = json.loads(workspace.peer_manifest_path(round_number, peer).read_bytes())
        return int(manifest.get("version", 1))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0  # no readable manifest beside it: pull it again


def _pull_adapter(
    store: Store,
    workspace: Workspace,
    verifier: Verifier,
    place: tuple[int, int],
    peer: str,
    rejected: dict,
) -> bool:
    """Whether the peer's adapter of the round, of this version or a later one, is (now) in
    the workspace, verified."""
    round_number, version = place
    if _pulled_version(workspace, round_number, peer) >= version:
        return True
    try:
        manifest_bytes = store.read(manifest_key(round_number, peer, version))
        adapter_bytes = store.read(adapter_key(round_number, peer, version))
        verified_adapter = verifier.check(
            round_number, peer, manifest_bytes, adapter_bytes, version
        )
    except KeyMissing:
        return False  # listed, then gone (an eventually consistent store): seen next time
    except Rejected as rejection:
        reason = str(rejection) if version == 1 else f"version {version}: {rejection}"
        if (peer, round_number, reason) not in rejected:
            logger.warning("rejected %s's adapter for round %d: %s", peer, round_number, reason)
            rejected[peer, round_number, reason] = {
                "device": peer,
                "round": round_number,
                "reason": reason,
            }
        return False
    # the manifest first: an adapter file is never there without the manifest that says its
    # version (a kill between the two leaves no adapter, so the next pull fetches it again);
    # kept as float16 whatever the wire encoding, so aggregation reads one format
    atomic_write_bytes(workspace.peer_manifest_path(round_number, peer), manifest_bytes)
    atomic_write_bytes(
        workspace.peer_adapter_path(round_number, peer), encode_adapter(verified_adapter.tensors)
    )
    return True


def pull_round(
    store: Store,
    workspace: Workspace,
    round_number: int,
    *,
    min_peers: int | None = 0,
    wait_seconds: float = 0.0,
    poll_seconds: float = DEFAULT_POLL_SECONDS,
    on_wait: Callable[[WaitState], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> PullReport:
    """Verify and keep every peer adapter of the round not yet pulled; log what is rejected.

    Waits up to `wait_seconds` until `min_peers` peers (None: every peer taking part) have
    published this round (older adapters do not end the wait: they are what is mixed when it
    runs out), calling `on_wait` before each poll. A store that does not answer is polled again
    with backoff until the wait ends; StoreUnreachable only when no poll got through at all.
    WaitInterrupted when `should_stop` turns true while waiting.
    """
    started = time.monotonic()
    deadline = started + wait_seconds
    report: PullReport | None = None
    outage: StoreUnreachable | None = None
    backoff = poll_seconds
    while True:
        try:
            report = _pull_once(store, workspace, round_number)
            outage, backoff = None, poll_seconds
        except StoreUnreachable as exc:
            outage, backoff = exc, min(2 * backoff, MAX_BACKOFF_SECONDS)
            logger.info("store unreachable while waiting: %s", exc.problem)
        left = deadline - time.monotonic()
        if (report is not None and report.complete(min_peers)) or left <= 0:
            break
        if should_stop is not None and should_stop():
            raise WaitInterrupted(f"stopped waiting for round {round_number}'s peers")
        if on_wait is not None:
            on_wait(
                WaitState(
                    round=round_number,
                    fresh=[] if report is None else report.fresh(),
                    missing=[] if report is None else report.missing(),
                    seconds_left=left,
                    outage=None if outage is None else outage.problem,
                )
            )
        time.sleep(min(backoff if outage else poll_seconds, left))
    if report is None:
        raise outage  # never reached the store within the wait
    return replace(
        report,
        waited_seconds=time.monotonic() - started,
        outage=None if outage is None else outage.problem,
    )
