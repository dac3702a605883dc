"""Text documents from a file or a folder, as a user points edgefed at them.

A document is one text file. Files that are not UTF-8 text are skipped and counted, not fatal:
a folder synced from a laptop always holds a stray binary. What is fatal is a path with no
usable text at all, because every later step would fail on it less clearly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from edgefed.errors import DataError, InputFileError

TEXT_SUFFIXES = (".txt", ".md")


@dataclass(frozen=True)
class Documents:
    """The readable documents under a path, and how many files were skipped."""

    texts: tuple[str, ...]
    paths: tuple[Path, ...]
    skipped: int

    def joined(self) -> str:
        """All documents as one text, separated by blank lines."""
        return "\n\n".join(self.texts)


def _read_text(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def read_documents(path: str | os.PathLike[str]) -> Documents:
    """Read a text file, or every .txt/.md file under a folder (sorted, recursive).

    Raises InputFileError for a missing path and DataError when no usable text is found.
    """
    root = Path(path)
    if not root.exists():
        raise InputFileError(f"data path {root} does not exist", "check the path")
    files = (
        [root]
        if root.is_file()
        else sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    )
    texts: list[str] = []
    kept: list[Path] = []
    skipped = 0
    for file in files:
        text = _read_text(file)
        if text is None:
            skipped += 1
        elif text.strip():
            texts.append(text)
            kept.append(file)
    if not texts:
        what = (
            "is not UTF-8 text"
            if root.is_file()
            else f"holds no non-empty {'/'.join(TEXT_SUFFIXES)} files"
        )
        raise DataError(
            f"{root} {what}" + (f" ({skipped} skipped as not text)" if skipped else ""),
            "point --data at UTF-8 text",
        )
    return Documents(texts=tuple(texts), paths=tuple(kept), skipped=skipped)
