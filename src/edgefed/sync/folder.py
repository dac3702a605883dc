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
import secrets
from pathlib import Path

from edgefed.atomic import is_temporary_name
from edgefed.errors import StoreError
from edgefed.faults import crash_point
from edgefed.sync.layout import FEDERATION_KEY, REFERENCE_KEY, ROUNDS_PREFIX, is_store_key
from edgefed.sync.signing import DeviceKey
from edgefed.sync.store import KEY_EXISTS_FIX, KEY_MISSING_FIX, KeyExists, KeyMissing, Store

# what sync tools and file systems keep in a folder they manage: a new store may hold these
_TOOL_FILES = (
    ".stfolder", ".stversions", ".stignore",  # Syncthing
    ".sync", "._sync_", ".owncloudsync.log", ".nextcloudsync.log",  # Resilio, Nextcloud
    ".dropbox",  # .dropbox, .dropbox.cache, .dropbox.attr
    ".DS_Store", ".Trash-", "lost+found", "desktop.ini", "Thumbs.db",  # file systems
)  # fmt: skip


class FolderStore(Store):
    """A federation store in a local folder (created on first write)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        # absolute, so a workspace that records it names the same folder from anywhere (not
        # resolved: a symlink or mount point stays as the user gave it)
        self.root = Path(root).expanduser().absolute()
        self.url = str(self.root)
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"store {self.root} is a file, not a folder", "pass a folder path")

    def check_empty(self) -> None:
        """StoreError when the folder holds files of its own, before `init` makes it a store: a
        mistyped path or a folder of documents must not become a federation, and a store's
        folder should hold nothing else. What sync tools keep there (`_TOOL_FILES`) and the
        temporary of a killed `init` do not count; a folder that holds a federation is left to
        `init`'s own refusal."""
        try:
            names = sorted(p.name for p in self.root.iterdir()) if self.root.is_dir() else []
        except OSError as exc:
            raise StoreError(f"cannot list {self.root} ({exc})", "check the folder") from exc
        if FEDERATION_KEY in names:
            return
        foreign = [
            name
            for name in names
            if not name.startswith(_TOOL_FILES)
            and not is_temporary_name(name)  # a write of a killed `init`
            and name != REFERENCE_KEY  # written first by an `init --reference` that was killed
        ]
        if foreign:
            entries = f"{len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'}"
            raise StoreError(
                f"{self.root} is not empty (holds {entries}, e.g. {foreign[0]})",
                "init into an empty or new folder",
            )

    def check_writable(self) -> None:
        """A temporary file made and removed where rounds are published: the folder's
        permissions, a read-only mount and a full disk all show here."""
        rounds = self.root / ROUNDS_PREFIX
        try:
            rounds.mkdir(parents=True, exist_ok=True)
            fd, probe = _new_temporary(rounds / "write-check")
            os.close(fd)
            probe.unlink()
        except OSError as exc:
            raise StoreError(
                f"cannot write to the store {self.root} ({exc.strerror or exc})",
                "make the folder writable for this user, or point the workspace at a writable "
                "copy with `edgefed device set --store PATH`",
            ) from exc

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
            fd, tmp = _new_temporary(final)
        except OSError as exc:
            raise StoreError(f"cannot write to {self.root} ({exc})", "check the folder") from exc
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


def _new_temporary(final: Path) -> tuple[int, Path]:
    """A new hidden temporary beside `final`, open for writing, named as `edgefed.atomic`
    names its own (so a leftover one is recognised the same way).

    Made with mode 0666 less the umask (and the folder's default ACL), as any file the user
    creates, not mkstemp's 0600: a store folder shared on NFS or a group drive is read by other
    users, and its hard link keeps the temporary's mode. Nothing secret is ever stored here.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = final.parent / f".{final.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(final.parent))
