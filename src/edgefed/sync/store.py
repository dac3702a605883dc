"""The federation store: a tiny interface, one backend per file.

`edgefed.sync.backends.open_store` picks the backend by URL scheme; this module imports none of
them, so that the interface stays as light as the lightest backend.

A store holds immutable blobs under the keys of `edgefed.sync.layout`. Three operations are
enough for the protocol: read a key, list the keys under a prefix, and create a key that does
not exist yet. Nothing is ever overwritten: a device publishes each round's adapter once, and a
registration is created once, so two devices can never clobber each other and a reader never
sees a blob change under it. Backends translate their own failures into `StoreError` (and a
missing key into `KeyMissing`) once, at their boundary.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from edgefed.errors import StoreError

if TYPE_CHECKING:
    from edgefed.sync.signing import DeviceKey

__all__ = [
    "KEY_EXISTS_FIX",
    "KEY_MISSING_FIX",
    "MAX_DOWNLOAD_BYTES",
    "KeyExists",
    "KeyMissing",
    "Store",
    "StoreUnreachable",
]

# far above any adapter; verification applies the federation's real limit afterwards, but a
# store that anyone can write to must not make a reader hold gigabytes first
MAX_DOWNLOAD_BYTES = 256 << 20


class KeyMissing(StoreError):
    """The key is not in the store (yet)."""


class KeyExists(StoreError):
    """`create` found the key already there; the store is unchanged."""


class StoreUnreachable(StoreError):
    """The store did not answer (network down, server down or overloaded) after the backend's
    own retries: worth trying again later, unlike a refused token or a damaged file. A round
    waiting for its peers rides these out until its wait ends."""


# the fixes every backend gives with these two errors, so that they read the same everywhere
KEY_MISSING_FIX = "check the store URL, or wait until it is published and sync again"
KEY_EXISTS_FIX = "keys are created once; nothing was overwritten"


class Store(ABC):
    """Where a federation's blobs live; see the module docstring for the contract."""

    url: str

    @abstractmethod
    def read(self, key: str) -> bytes:
        """The blob at `key`; raises KeyMissing when there is none."""

    @abstractmethod
    def keys(self, prefix: str = "") -> list[str]:
        """Every complete layout key under `prefix`, sorted; incomplete writes never show."""

    @abstractmethod
    def create(self, key: str, data: bytes, *, signer: DeviceKey | None = None) -> None:
        """Store `data` at a new `key` atomically; raises KeyExists when the key is taken.

        A device signs the writes of its own keys with `signer`; the relay requires it (see
        `edgefed.sync.wire`), a folder has no one to show it to.
        """

    def check_writable(self) -> None:  # noqa: B027 - optional hook, deliberately not abstract
        """StoreError when this device cannot write here, checked before a round trains so
        that a read-only store is not found after an hour of training. Backends that can tell
        without creating a key do; the relay checks its token on every request (a token that
        reads may also write), and an S3 bucket's policy shows only when a key is written."""

    def close(self) -> None:  # noqa: B027 - optional hook, deliberately not abstract
        """Release connections; a no-op for stores that hold none."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
