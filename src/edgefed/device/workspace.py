"""A device's workspace: its identity, its private key, and what it pulled, round by round.

    device.json                  {"format", "federation", "device", "store", "data", "joined"}
    device.key                   Ed25519 private key (PEM, mode 0600); never leaves the device
    federation.json              the federation manifest as first seen (pinned)
    reference.txt                the shared reference text, when the federation has one
    peers.json                   each peer's public key as first seen (pinned)
    rounds/<r>/peers/<d>.safetensors   verified adapters pulled for round r
    rounds/<r>/rejected.json     what was not used for round r, and why

Pinning makes the store trust-on-first-use: after a device has seen a peer's key (or the
federation manifest) once, a store that later swaps it cannot slip a forged adapter past this
device. Every write here is atomic.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from edgefed.atomic import atomic_write_text
from edgefed.errors import InputFileError, ModelFormatError
from edgefed.home import edgefed_home
from edgefed.sync.signing import DeviceKey

WORKSPACE_FORMAT = 1


def default_workspace(federation_id: str, device: str) -> Path:
    return edgefed_home() / federation_id / device


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputFileError(
            f"{path.parent} is not a device workspace (no {path.name})",
            "pass the --workspace that `edgefed join` made",
        ) from None
    except (OSError, ValueError) as exc:
        raise ModelFormatError(
            f"{what} {path} is damaged ({exc})", "restore the workspace"
        ) from None


def write_json(path: Path, document: dict | list) -> None:
    atomic_write_text(path, json.dumps(document, indent=1, sort_keys=True) + "\n")


@dataclass(frozen=True)
class Workspace:
    """An existing device workspace (see the module docstring for its files)."""

    root: Path

    @classmethod
    def open(cls, root: str | os.PathLike[str]) -> Workspace:
        workspace = cls(Path(root).expanduser())
        config = workspace.config
        if config.get("format") != WORKSPACE_FORMAT:
            raise ModelFormatError(f"{workspace.root} is not a format-1 workspace", "join again")
        return workspace

    @property
    def config(self) -> dict:
        return _read_json(self.root / "device.json", "device config")

    @property
    def device(self) -> str:
        return self.config["device"]

    @property
    def federation(self) -> dict:
        return _read_json(self.root / "federation.json", "pinned federation manifest")

    def key(self) -> DeviceKey:
        return DeviceKey.load(self.root / "device.key")

    def pinned_peers(self) -> dict[str, str]:
        path = self.root / "peers.json"
        return _read_json(path, "pinned peer keys") if path.exists() else {}

    def pin_peers(self, peers: dict[str, str]) -> None:
        write_json(self.root / "peers.json", peers)

    def round_dir(self, round_number: int) -> Path:
        return self.root / "rounds" / str(round_number)

    def peer_adapter_path(self, round_number: int, device: str) -> Path:
        return self.round_dir(round_number) / "peers" / f"{device}.safetensors"

    def rejections(self, round_number: int) -> list[dict]:
        path = self.round_dir(round_number) / "rejected.json"
        return _read_json(path, "rejection log") if path.exists() else []

    def record_rejections(self, round_number: int, rejections: list[dict]) -> None:
        write_json(self.round_dir(round_number) / "rejected.json", rejections)

    def rounds(self) -> list[int]:
        folder = self.root / "rounds"
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def find_workspace(root: str | os.PathLike[str] | None) -> Workspace:
    """`root`, or the only workspace under $EDGEFED_HOME when none is given."""
    if root is not None:
        return Workspace.open(root)
    found = sorted(p.parent for p in edgefed_home().glob("*/*/device.json"))
    if len(found) == 1:
        return Workspace.open(found[0])
    if not found:
        raise InputFileError(
            f"no device workspace under {edgefed_home()}", "join a federation with `edgefed join`"
        )
    raise InputFileError(
        f"{len(found)} device workspaces under {edgefed_home()}",
        "choose one with --workspace (" + ", ".join(str(p) for p in found[:4]) + ")",
    )
