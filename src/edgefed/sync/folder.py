"""The folder store: a directory that Syncthing, Dropbox, NFS or a USB stick keeps in step.

Publishing is atomic: the blob is written to a hidden temp file in the target folder, fsynced,
then hard-linked to its final name. `link` fails when the name exists, so creating a key is
atomic *and* exclusive (two devices racing for one name: exactly one wins), and a reader sees
either no file or the complete one. Sync tools may still deliver a file in pieces on the far
side; readers therefore check every blob's sha256 against its signed manifest before use.

Conflict copies (`x.sync-conflict-….json`, `x (conflicted copy ….json`), temp files and anything
else outside the layout are ignored, because `keys()` lists layout keys only.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from edgefed.errors import StoreError
from edgefed.faults import crash_point
from edgefed.sync.layout import is_store_key
from edgefed.sync.signing import DeviceKey
from edgefed.sync.store import KEY_EXISTS_FIX, KEY_MISSING_FIX, KeyExists, KeyMissing, Store


class FolderStore(Store):
    """A federation store in a local folder (created on first write)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        # absolute, so a workspace that records it names the same folder from anywhere (not
        # resolved: a symlink or mount point stays as the user gave it)
        self.root = Path(root).expanduser().absolute()
        self.url = str(self.root)
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"store {self.root} is a file, not a folder", "pass a folder path")

    def _path(self, key: str) -> Path:
        if not is_store_key(key):
            raise StoreError(f"'{key}' is not a federation store key", "this is a bug; report it")
        return self.root / key

    def read(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as exc:
            raise KeyMissing(f"{key} is not in the store {self.root}", KEY_MISSING_FIX) from exc
        except OSError as exc:
            raise StoreError(
                f"cannot read {key} from {self.root} ({exc})", "check the folder"
            ) from exc

    def keys(self, prefix: str = "") -> list[str]:
        base = self.root / prefix if prefix else self.root
        found = []
        try:
            if not base.is_dir():
                return []
            for path in base.rglob("*"):
                key = path.relative_to(self.root).as_posix()
                if path.is_file() and is_store_key(key):
                    found.append(key)
        except OSError as exc:
            raise StoreError(f"cannot list {base} ({exc})", "check the folder") from exc
        return sorted(found)

    def create(self, key: str, data: bytes, *, signer: DeviceKey | None = None) -> None:
        final = self._path(key)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(
                prefix=f".{final.name}.", suffix=".tmp", dir=final.parent
            )
        except OSError as exc:
            raise StoreError(f"cannot write to {self.root} ({exc})", "check the folder") from exc
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            crash_point("store-write")
            try:
                os.link(tmp, final)  # atomic and exclusive: fails if the key exists
            except FileExistsError as exc:
                raise KeyExists(f"{key} already exists in {self.root}", KEY_EXISTS_FIX) from exc
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                # file systems without hard links (FAT on a USB stick): rename, checked first
                if final.exists():
                    raise KeyExists(f"{key} already exists in {self.root}", KEY_EXISTS_FIX) from exc
                os.replace(tmp, final)
            dir_fd = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise StoreError(
                f"cannot write {key} to {self.root} ({exc})", "check the folder"
            ) from exc
        finally:
            tmp.unlink(missing_ok=True)
