"""Atomic writes: a reader (or a crash) never sees a half-written file or folder.

Every file edgefed writes goes through here: data is written to a temporary sibling in the same
folder (so the final rename never crosses a file system), flushed and fsynced, then moved over
the destination with `os.replace`, and the folder entry itself is fsynced. On any exception the
temporary is removed and the destination is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(destination: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `destination` atomically.

    For writers that insist on a file name (the gguf writer, llama.cpp's quantizer).
    """
    final = Path(destination)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(destination: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `destination` atomically."""
    with atomic_path(destination) as tmp:
        tmp.write_bytes(data)


def atomic_write_private(destination: str | os.PathLike[str], data: bytes) -> None:
    """Write a secret (a key, a token) atomically, readable by its owner only from the first
    byte on (the temporary is created mode 0600 and never loosened)."""
    with atomic_path(destination) as tmp:
        os.chmod(tmp, 0o600)
        tmp.write_bytes(data)


def atomic_write_text(destination: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 `text` to `destination` atomically."""
    atomic_write_bytes(destination, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(destination: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it takes the place of `destination`.

    An existing destination is moved aside first and deleted only after the new folder is in
    place, so at every instant either the old or the new complete folder exists.
    """
    final = Path(destination)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb+") as handle:
                    os.fsync(handle.fileno())
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            os.replace(final, old / final.name)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# how atomic_path and atomic_dir name their temporaries: "." + the destination's name + "." +
# mkstemp's 8 random characters + ".tmp" (".old": a folder's previous version moved aside)
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.(?:tmp|old)")


def is_temporary_name(name: str) -> bool:
    """Whether `name` is how this module (and the folder store, which follows it) names a
    temporary: what a killed write leaves behind."""
    return _LEFTOVER.fullmatch(name) is not None


def find_leftovers(
    folder: str | os.PathLike[str], names: Iterable[str] | None = None
) -> list[Path]:
    """The temporaries that writes killed mid-way (kill -9, a power cut: no `finally` ran)
    left in `folder`, those for the destinations `names` only if given. Only this module's
    own pattern matches, never another file."""
    wanted = None if names is None else set(names)
    try:
        entries = sorted(Path(folder).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for path in entries:
        match = _LEFTOVER.fullmatch(path.name)
        if match is not None and (wanted is None or match["name"] in wanted):
            found.append(path)
    return found


def remove_leftovers(
    folder: str | os.PathLike[str], names: Iterable[str] | None = None
) -> list[Path]:
    """Delete what `find_leftovers` finds; the paths removed.

    Call it only where no other process writes into `folder` at that moment (a run folder
    about to be resumed, a round step about to rewrite its outputs): a live writer's
    temporary has the same name.
    """
    removed = find_leftovers(folder, names)
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed
