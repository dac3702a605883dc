"""Ed25519 device keys: the private key never leaves the workspace, the public key is registered.

Signatures cover canonical bytes: JSON with sorted keys, no insignificant whitespace, UTF-8.
The same document therefore signs and verifies to the same bytes on every device, whatever
order its fields were built in.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgefed.atomic import atomic_write_private
from edgefed.errors import InputFileError


def canonical_bytes(document: Mapping) -> bytes:
    """The bytes a signature covers (see the module docstring)."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def write_claim(key: str, body: bytes) -> dict:
    """What a device signs to write `key` with `body` to a relay, which checks the same document."""
    return {"key": key, "sha256": hashlib.sha256(body).hexdigest()}


def encode_public_key(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def decode_public_key(text: str) -> Ed25519PublicKey:
    """Raise ValueError when `text` is not a base64 raw Ed25519 public key."""
    raw = base64.b64decode(text, validate=True)
    if len(raw) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


class DeviceKey:
    """A device's Ed25519 key pair."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public_key = encode_public_key(private.public_key())

    @classmethod
    def generate(cls) -> DeviceKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DeviceKey:
        """Read a PEM private key; InputFileError when it is missing or damaged."""
        try:
            private = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise InputFileError(
                f"cannot read the device key {path} ({exc})",
                "restore the workspace, or join again as a new device",
            ) from exc
        if not isinstance(private, Ed25519PrivateKey):
            raise InputFileError(f"{path} is not an Ed25519 key", "join again as a new device")
        return cls(private)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the private key as PEM, readable by the owner only."""
        pem = self._private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        atomic_write_private(path, pem)

    def sign(self, document: Mapping) -> str:
        return base64.b64encode(self._private.sign(canonical_bytes(document))).decode("ascii")


def signature_is_valid(public_key: str, document: Mapping, signature: str) -> bool:
    """Whether `signature` is `public_key`'s signature of `document`; never raises."""
    try:
        decode_public_key(public_key).verify(
            base64.b64decode(signature, validate=True), canonical_bytes(document)
        )
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True
