"""The federation store: a tiny interface, one backend per file, `open_store` picks by scheme.

A store holds immutable blobs under the keys of `edgefed.sync.layout`. Three operations are
enough for the protocol: read a key, list the keys under a prefix, and create a key that does
not exist yet. Nothing is ever overwritten: a device publishes each round's adapter once, and a
registration is created once, so two devices can never clobber each other and a reader never
sees a blob change under it. Backends translate their own failures into `StoreError` (and a
missing key into `KeyMissing`) once, at their boundary.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from edgefed.errors import StoreError

if TYPE_CHECKING:
    from edgefed.sync.signing import DeviceKey


# far above any adapter; verification applies the federation's real limit afterwards, but a
# store that anyone can write to must not make a reader hold gigabytes first
MAX_DOWNLOAD_BYTES = 256 << 20


class KeyMissing(StoreError):
    """The key is not in the store (yet)."""


class KeyExists(StoreError):
    """`create` found the key already there; the store is unchanged."""


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
        `edgefed.sync.relay`), a folder has no one to show it to.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, deliberately not abstract
        """Release connections; a no-op for stores that hold none."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_store(url: str | os.PathLike[str], *, token: str | None = None) -> Store:
    """A folder path (or file:// URL) opens a FolderStore; http(s):// a RelayStore; s3:// an
    S3Store (its credentials come from the AWS configuration, not from `token`)."""
    text = os.fspath(url)
    if text.startswith(("http://", "https://")):
        from edgefed.sync.relay_client import RelayStore

        return RelayStore(text, token=token)
    if text.startswith("s3://"):
        from edgefed.sync.s3 import S3Store

        return S3Store(text)
    from edgefed.sync.folder import FolderStore

    return FolderStore(text.removeprefix("file://"))
