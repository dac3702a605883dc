"""A device's workspace: its identity, its key, what it pulled, and its rounds; this module owns
the workspace's layout as `edgefed.sync.layout` owns the store's.

    device.json                  DeviceConfig: federation, device, store, data, base, joined
    device.key                   Ed25519 private key (PEM, mode 0600); never leaves the device
    token                        the relay's bearer token given at join (mode 0600), if any
    federation.json              the federation manifest as first seen (pinned)
    reference.txt                the shared reference text, when the federation has one
    peers.json                   each peer's public key as first seen (pinned)
    rounds/<r>/train/            the round's training run (`edgefed.train.run_folder`)
    rounds/<r>/release.safetensors   the noised adapter published with --dp-clip
    rounds/<r>/peers/<d>.safetensors verified adapters pulled for round r (+ <d>.json manifest)
    rounds/<r>/rejected.json     what was not used for round r, and why
    rounds/<r>/aggregated/       the mix (PEFT folder), and aggregated.gguf for llama.cpp
    rounds/<r>/trust.json        TrustRecord
    rounds/<r>/evaluation.json   EvaluationRecord
    rounds/<r>/round.json        RoundRecord

A machine knows its workspaces: those under $EDGEFED_HOME/<federation>/<device>/ and those
`join --workspace` made elsewhere, which join records in $EDGEFED_HOME/workspaces.json. A
command without --workspace uses $EDGEFED_WORKSPACE, else the only workspace it knows.

Pinning makes the store trust-on-first-use: after a device has seen a peer's key (or the
federation manifest) once, a store that later swaps it cannot slip a forged adapter past this
device. Every write here is atomic.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgefed.atomic import atomic_write_private
from edgefed.device.records import EvaluationRecord, RoundRecord, TrustRecord
from edgefed.errors import InputFileError
from edgefed.home import edgefed_home
from edgefed.record_file import RecordFile, read_json_file, write_json_file
from edgefed.sync.manifest import Federation
from edgefed.sync.signing import DeviceKey
from edgefed.train.run_folder import RunFolder

if TYPE_CHECKING:
    from edgefed.loaded_base import LoadedBase

DEVICE_FILE = "device.json"
KEY_FILE = "device.key"
FEDERATION_FILE = "federation.json"
REFERENCE_FILE = "reference.txt"
PEERS_FILE = "peers.json"
TOKEN_FILE = "token"
REGISTRY_FILE = "workspaces.json"  # under $EDGEFED_HOME: workspaces joined elsewhere
WORKSPACE_VARIABLE = "EDGEFED_WORKSPACE"


@dataclass(frozen=True)
class DeviceConfig(RecordFile):
    FILE = DEVICE_FILE
    KIND = "device config"
    FIX = "restore the workspace from a backup, or join again under a new --device name"

    federation: str
    device: str
    store: str
    data: str
    base: str
    joined: str
    left: str | None = None  # when `edgefed leave` published this device's departure


def default_workspace(federation_id: str, device: str) -> Path:
    return edgefed_home() / federation_id / device


@dataclass(frozen=True)
class Workspace:
    """An existing device workspace (see the module docstring for its files)."""

    root: Path

    @classmethod
    def open(cls, root: str | os.PathLike[str]) -> Workspace:
        workspace = cls(Path(root).expanduser())
        if not (workspace.root / DEVICE_FILE).is_file():
            raise InputFileError(
                f"{workspace.root} is not a device workspace (no {DEVICE_FILE})",
                "pass the --workspace that `edgefed join` made",
            )
        workspace.config  # noqa: B018 - refuses a damaged or newer config now, not mid-round
        return workspace

    @property
    def config(self) -> DeviceConfig:
        return DeviceConfig.read(self.root / DEVICE_FILE)

    @property
    def device(self) -> str:
        return self.config.device

    @functools.cached_property
    def federation(self) -> Federation:
        """The pinned manifest, parsed once: it never changes after `join`."""
        document = read_json_file(
            self.root / FEDERATION_FILE, "pinned federation manifest", DeviceConfig.FIX
        )
        return Federation.from_document(document, f"the pinned {self.root / FEDERATION_FILE}")

    def check_base(self, loaded: LoadedBase) -> None:
        """AdapterMismatchError unless `loaded` is the federation's base: a step over another
        base would train, score or convert against weights no peer has."""
        self.federation.check_base(
            loaded.info, f"load the base the workspace joined with: {self.config.base}"
        )

    def pin_federation(self, federation: Federation) -> None:
        write_json_file(self.root / FEDERATION_FILE, federation.document)

    @property
    def key_path(self) -> Path:
        return self.root / KEY_FILE

    def key(self) -> DeviceKey:
        return DeviceKey.load(self.key_path)

    @property
    def token_path(self) -> Path:
        return self.root / TOKEN_FILE

    def saved_token(self) -> str | None:
        """The relay token kept at join, if any."""
        path = self.token_path
        return (path.read_text(encoding="utf-8").strip() or None) if path.is_file() else None

    def save_token(self, token: str) -> None:
        """Keep the relay token for later commands, readable by the owner only."""
        atomic_write_private(self.token_path, token.encode("utf-8"))

    @property
    def reference_path(self) -> Path:
        return self.root / REFERENCE_FILE

    def pinned_peers(self) -> dict[str, str]:
        path = self.root / PEERS_FILE
        return read_json_file(path, "pinned peer keys", DeviceConfig.FIX) if path.exists() else {}

    def pin_peers(self, peers: dict[str, str]) -> None:
        write_json_file(self.root / PEERS_FILE, dict(sorted(peers.items())))

    # rounds
    def rounds(self) -> list[int]:
        folder = self.root / "rounds"
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())

    def round_dir(self, round_number: int) -> Path:
        return self.root / "rounds" / str(round_number)

    def train_run(self, round_number: int) -> RunFolder:
        return RunFolder(self.round_dir(round_number) / "train")

    def release_path(self, round_number: int) -> Path:
        return self.round_dir(round_number) / "release.safetensors"

    def peers_dir(self, round_number: int) -> Path:
        return self.round_dir(round_number) / "peers"

    def peer_adapter_path(self, round_number: int, device: str) -> Path:
        return self.peers_dir(round_number) / f"{device}.safetensors"

    def peer_manifest_path(self, round_number: int, device: str) -> Path:
        return self.peers_dir(round_number) / f"{device}.json"

    def aggregated_dir(self, round_number: int) -> Path:
        return self.round_dir(round_number) / "aggregated"

    def aggregated_gguf(self, round_number: int) -> Path:
        return self.round_dir(round_number) / "aggregated.gguf"

    def trust_path(self, round_number: int) -> Path:
        return self.round_dir(round_number) / TrustRecord.FILE

    def evaluation_path(self, round_number: int) -> Path:
        return self.round_dir(round_number) / EvaluationRecord.FILE

    def round_record_path(self, round_number: int) -> Path:
        return self.round_dir(round_number) / RoundRecord.FILE

    def rejections(self, round_number: int) -> list[dict]:
        path = self.round_dir(round_number) / "rejected.json"
        return read_json_file(path, "rejection log") if path.exists() else []

    def record_rejections(self, round_number: int, rejections: list[dict]) -> None:
        write_json_file(self.round_dir(round_number) / "rejected.json", rejections)

    def read_trust(self, round_number: int) -> TrustRecord | None:
        path = self.trust_path(round_number)
        return TrustRecord.read(path) if path.is_file() else None

    def read_evaluation(self, round_number: int) -> EvaluationRecord | None:
        path = self.evaluation_path(round_number)
        return EvaluationRecord.read(path) if path.is_file() else None

    def read_round_record(self, round_number: int) -> RoundRecord:
        path = self.round_record_path(round_number)
        return RoundRecord.read(path) if path.is_file() else RoundRecord(round=round_number)

    def next_round(self) -> int:
        """The first round this device has not finished (0 for a new device)."""
        for round_number in self.rounds():
            if not self.read_round_record(round_number).is_finished():
                return round_number
        return max(self.rounds(), default=-1) + 1

    def last_aggregated_round(self) -> int:
        """The latest round with a trust row; InputFileError when there is none."""
        finished = [r for r in self.rounds() if self.trust_path(r).is_file()]
        if not finished:
            raise InputFileError(
                f"{self.device} has no aggregated round to evaluate", "run `edgefed round` first"
            )
        return finished[-1]


def known_workspaces() -> list[Path]:
    """Every workspace this machine knows: under $EDGEFED_HOME, and those join recorded."""
    found = {p.parent.absolute() for p in edgefed_home().glob(f"*/*/{DEVICE_FILE}")}
    registry = edgefed_home() / REGISTRY_FILE
    if registry.is_file():
        recorded = read_json_file(registry, "workspace list", f"delete {registry}")
        if isinstance(recorded, list):
            found |= {Path(p) for p in recorded if (Path(p) / DEVICE_FILE).is_file()}
    return sorted(found)


def remember_workspace(root: Path) -> None:
    """Record a workspace made outside $EDGEFED_HOME, so the machine still knows it."""
    root = root.absolute()
    if root.is_relative_to(edgefed_home().absolute()):
        return
    registry = edgefed_home() / REGISTRY_FILE
    known = [str(p) for p in known_workspaces() if not p.is_relative_to(edgefed_home())]
    if str(root) not in known:
        write_json_file(registry, sorted([*known, str(root)]))


def find_workspace(root: str | os.PathLike[str] | None) -> Workspace:
    """`root`, else $EDGEFED_WORKSPACE, else the only workspace this machine knows."""
    if root is None:
        root = os.environ.get(WORKSPACE_VARIABLE) or None
    if root is not None:
        return Workspace.open(root)
    found = known_workspaces()
    if len(found) == 1:
        return Workspace.open(found[0])
    if not found:
        raise InputFileError(
            f"no device workspace on this machine (none under {edgefed_home()}, none recorded "
            "by `edgefed join --workspace`)",
            "join a federation with `edgefed join`, or pass --workspace DIR",
        )
    raise InputFileError(
        f"{len(found)} device workspaces on this machine, so none is the default",
        f"choose one with --workspace or ${WORKSPACE_VARIABLE} (`edgefed device list` shows them)",
    )
