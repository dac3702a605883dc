"""The federation store's key layout, the same on every backend.

    federation.json                  federation manifest (id, base, LoRA spec, schedule, trust)
    reference.txt                    optional shared reference text for prediction trust
    devices/<device>.json            a device's registration: its Ed25519 public key
    rounds/<r>/<device>.safetensors  the device's adapter for round r
    rounds/<r>/<device>.json         its signed manifest
    rounds/<r>/<device>.v<k>.*       a signed replacement (version k >= 2) of both, published
                                     when the first is damaged or lost; readers take the
                                     highest version that verifies (nothing is ever overwritten)
    departures/<device>.json         a device's signed notice that it left the federation

Keys are data, checked here once: a device name is 1-64 characters of [a-z0-9_-] starting with
a letter or digit, a round is a non-negative decimal without leading zeros. Anything else under
the store (a sync tool's conflict copy, a temp file, a stray note) does not match and is never
read, which is how readers ignore what they did not expect.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from edgefed.errors import InputFileError

FEDERATION_KEY = "federation.json"
REFERENCE_KEY = "reference.txt"
DEVICES_PREFIX = "devices/"
DEPARTURES_PREFIX = "departures/"
ROUNDS_PREFIX = "rounds/"
ADAPTER_SUFFIX = ".safetensors"
MANIFEST_SUFFIX = ".json"
MAX_VERSION = 9999

_DEVICE = r"[a-z0-9][a-z0-9_-]{0,63}"
_ROUND = r"0|[1-9][0-9]{0,8}"
_VERSION = r"[2-9]|[1-9][0-9]{1,3}"  # version 1 has no tag: stores made before versions read
DEVICE_NAME = re.compile(rf"^{_DEVICE}$")
_KEY = re.compile(
    rf"^(?:federation\.json|reference\.txt|devices/(?P<registered>{_DEVICE})\.json"
    rf"|departures/(?P<departed>{_DEVICE})\.json"
    rf"|rounds/(?P<round>{_ROUND})/(?P<device>{_DEVICE})(?:\.v(?P<version>{_VERSION}))?"
    rf"(?P<suffix>\.json|\.safetensors))$"
)


@dataclass(frozen=True)
class RoundItem:
    """A key under rounds/: which round, which device, and whether manifest or adapter."""

    round: int
    device: str
    is_manifest: bool
    version: int = 1


def check_device_name(name: str) -> str:
    if not DEVICE_NAME.match(name):
        raise InputFileError(
            f"'{name}' is not a valid device name",
            "use 1-64 lowercase letters, digits, '-' or '_', starting with a letter or digit",
        )
    return name


def is_store_key(key: str) -> bool:
    """Whether `key` is one the layout defines (no traversal, no stray or conflict files)."""
    return _KEY.match(key) is not None


def device_key(device: str) -> str:
    return f"{DEVICES_PREFIX}{check_device_name(device)}.json"


def departure_key(device: str) -> str:
    return f"{DEPARTURES_PREFIX}{check_device_name(device)}.json"


def _round_item_key(round_number: int, device: str, version: int, suffix: str) -> str:
    if not 1 <= int(version) <= MAX_VERSION:
        raise InputFileError(
            f"adapter version {version} is outside 1..{MAX_VERSION}",
            f"a round's adapter can be replaced at most {MAX_VERSION - 1} times",
        )
    tag = "" if version == 1 else f".v{int(version)}"
    return f"{ROUNDS_PREFIX}{int(round_number)}/{check_device_name(device)}{tag}{suffix}"


def adapter_key(round_number: int, device: str, version: int = 1) -> str:
    return _round_item_key(round_number, device, version, ADAPTER_SUFFIX)


def manifest_key(round_number: int, device: str, version: int = 1) -> str:
    return _round_item_key(round_number, device, version, MANIFEST_SUFFIX)


def parse_round_key(key: str) -> RoundItem | None:
    match = _KEY.match(key)
    if match is None or match["round"] is None:
        return None
    return RoundItem(
        int(match["round"]),
        match["device"],
        match["suffix"] == MANIFEST_SUFFIX,
        int(match["version"] or 1),
    )


def publishes(keys: Iterable[str]) -> dict[str, dict[int, dict[int, bool]]]:
    """Device -> round -> version -> whether that publish is complete (its blob and its
    manifest both among `keys`): what every reader of rounds/ needs, from one listing. A
    version with one half only is a publish cut short or half lost."""
    halves: dict[tuple[str, int, int], set[bool]] = {}
    for key in keys:
        item = parse_round_key(key)
        if item is not None:
            halves.setdefault((item.device, item.round, item.version), set()).add(item.is_manifest)
    found: dict[str, dict[int, dict[int, bool]]] = {}
    for (device, number, version), kinds in sorted(halves.items()):
        found.setdefault(device, {}).setdefault(number, {})[version] = len(kinds) == 2
    return found


def parse_departure_key(key: str) -> str | None:
    """The device a departures/ key belongs to, or None."""
    match = _KEY.match(key)
    return None if match is None else match["departed"]


def key_owner(key: str) -> str | None:
    """The device that alone may write `key`, or None for federation-wide keys."""
    match = _KEY.match(key)
    if match is None:
        return None
    return match["registered"] or match["device"] or match["departed"]
