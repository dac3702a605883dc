"""`open_store`: the one place that maps a store URL to its backend.

The interface (`edgefed.sync.store`) knows no backend, and each backend is imported only when a
URL asks for it: opening a shared folder never loads httpx or boto3, and a device talking to a
relay never loads the relay's server side (Starlette).
"""

from __future__ import annotations

import os

from edgefed.sync.store import Store

__all__ = ["open_store"]


def open_store(url: str | os.PathLike[str], *, token: str | None = None) -> Store:
    """A folder path (or file:// URL) opens a FolderStore; http(s):// a RelayStore; s3:// an
    S3Store (its credentials come from the AWS configuration, not from `token`).

    Raises StoreError when the store cannot be opened (a folder path that is a file, a
    malformed s3:// URL, boto3 missing).
    """
    text = os.fspath(url)
    if text.startswith(("http://", "https://")):
        from edgefed.sync.relay_client import RelayStore

        return RelayStore(text, token=token)
    if text.startswith("s3://"):
        from edgefed.sync.s3 import S3Store

        return S3Store(text)
    from edgefed.sync.folder import FolderStore

    return FolderStore(text.removeprefix("file://"))
