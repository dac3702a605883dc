"""Text documents from a file or a folder, as a user points edgefed at them.

A .txt or .md file is one document; a .jsonl file holds one document per line (a JSON object
with a text field); a .csv file one per row (a named column). Each document is identified by the
sha256 of its text, so its identity (and the split it falls in) does not depend on where it sits
or what else is in the folder; exact duplicates are kept once and counted.

A .txt/.md file longer than LONG_FILE_CHARS (32,000 characters) is a book or a log, not one
document: whole, it would land in a single split, and a client holding one such file could not be
split at all. It is cut into documents of consecutive paragraphs (text between blank lines) of at
most BLOCK_CHARS (8,000 characters) each, source "path#n" (n from 1); a paragraph longer than that
is cut at line breaks, and a line longer than that every BLOCK_CHARS characters. Paragraphs in a
block are joined by one blank line. The longest BBC News article of the demo data is 25,485
characters, so articles, and files like them, stay whole. Cutting is a pure function of the
file's text: the same file gives the same blocks (and ids); text appended at its end changes only
the last block and adds new ones.

Files that are not UTF-8 text are skipped and counted, not fatal: a folder synced from a laptop
always holds a stray binary. Fatal are a path with no usable text at all and a structured file
that is malformed (a .jsonl line that is not JSON, a missing field or column), because silently
dropping part of a user's data would make every later number wrong without saying so.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edgefed.errors import DataError, InputFileError

DOCUMENT_SUFFIXES = (".txt", ".md", ".jsonl", ".csv")
DEFAULT_TEXT_FIELD = "text"
LONG_FILE_CHARS = 32_000  # a .txt/.md file longer than this is cut into blocks
BLOCK_CHARS = 8_000  # the most characters of one block
_BLANK_LINES = re.compile(r"\r?\n(?:[ \t]*\r?\n)+")


@dataclass(frozen=True)
class Document:
    """One document: `id` is the sha256 of its text (hex), `source` says where it came from."""

    id: str
    text: str
    source: str


@dataclass(frozen=True)
class Documents:
    """The readable documents under a path, and what was left out."""

    documents: tuple[Document, ...]
    files: int
    skipped: tuple[str, ...]  # the files that are not UTF-8 text, as found under the path
    duplicates: int  # documents whose exact text appeared before

    @property
    def texts(self) -> tuple[str, ...]:
        return tuple(d.text for d in self.documents)

    def joined(self) -> str:
        """All documents as one text, separated by blank lines."""
        return "\n\n".join(self.texts)


def skipped_files(skipped: tuple[str, ...] | list[str], shown: int = 5) -> str:
    """'skipped 2 files that are not UTF-8 text: a.bin, b.txt', naming the first few: the user
    must be able to find them (a mis-encoded export, a binary dropped in the folder)."""
    names = ", ".join(skipped[:shown]) + (
        f" and {len(skipped) - shown} more" if len(skipped) > shown else ""
    )
    files = "1 file that is" if len(skipped) == 1 else f"{len(skipped)} files that are"
    return f"skipped {files} not UTF-8 text: {names}"


def document_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read_text(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None


def _jsonl_texts(path: Path, text: str, field: str) -> Iterator[tuple[str, str]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{number} is not valid JSON ({exc.msg})",
                "fix or remove that line; each line of a .jsonl file is one JSON object",
            ) from exc
        value = record.get(field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise DataError(
                f"{path}:{number} has no string field '{field}'",
                "name the field that holds the text with --text-field",
            )
        yield value, f"{path}:{number}"


def _csv_texts(path: Path, text: str, column: str) -> Iterator[tuple[str, str]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # articles are longer than 128 KiB at times
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None or column not in reader.fieldnames:
        found = ", ".join(reader.fieldnames or []) or "none"
        raise DataError(
            f"{path} has no column '{column}' (columns: {found})",
            "name the column that holds the text with --text-field",
        )
    for number, row in enumerate(reader, start=2):
        yield row[column] or "", f"{path}:{number}"


def _pieces(paragraph: str) -> Iterator[str]:
    """A paragraph as pieces of at most BLOCK_CHARS: itself, or its lines packed, or cut."""
    if len(paragraph) <= BLOCK_CHARS:
        yield paragraph
        return
    piece = ""
    for line in paragraph.split("\n"):
        while len(line) > BLOCK_CHARS:
            if piece:
                yield piece
                piece = ""
            yield line[:BLOCK_CHARS]
            line = line[BLOCK_CHARS:]
        if piece and len(piece) + 1 + len(line) > BLOCK_CHARS:
            yield piece
            piece = ""
        piece = f"{piece}\n{line}" if piece else line
    if piece.strip():
        yield piece


def text_blocks(text: str) -> list[str]:
    """A long text cut into blocks of consecutive paragraphs, each at most BLOCK_CHARS."""
    blocks: list[str] = []
    block = ""
    for paragraph in _BLANK_LINES.split(text):
        paragraph = paragraph.rstrip()
        if not paragraph.strip():
            continue
        for piece in _pieces(paragraph):
            if block and len(block) + 2 + len(piece) > BLOCK_CHARS:
                blocks.append(block)
                block = ""
            block = f"{block}\n\n{piece}" if block else piece
    if block:
        blocks.append(block)
    return blocks


def _file_texts(path: Path, text: str, field: str) -> Iterator[tuple[str, str]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_texts(path, text, field)
    elif suffix == ".csv":
        yield from _csv_texts(path, text, field)
    elif len(text) > LONG_FILE_CHARS:
        for number, block in enumerate(text_blocks(text), start=1):
            yield block, f"{path}#{number}"
    else:
        yield text, str(path)


def read_documents(
    path: str | os.PathLike[str], *, text_field: str = DEFAULT_TEXT_FIELD
) -> Documents:
    """Read a file, or every .txt/.md/.jsonl/.csv file under a folder (sorted, recursive).

    `text_field` names the JSON field of a .jsonl line and the column of a .csv file.
    Raises InputFileError for a missing path and DataError for malformed structured files or
    when no usable text is found.
    """
    root = Path(path)
    if not root.exists():
        raise InputFileError(f"data path {root} does not exist", "check the path")
    files = (
        [root]
        if root.is_file()
        else sorted(
            p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in DOCUMENT_SUFFIXES
        )
    )
    documents: list[Document] = []
    seen: set[str] = set()
    skipped: list[str] = []
    duplicates = 0
    for file in files:
        text = _read_text(file)
        if text is None:
            skipped.append(str(file if file == root else file.relative_to(root)))
            continue
        for document_text, source in _file_texts(file, text, text_field):
            if not document_text.strip():
                continue
            identity = document_id(document_text)
            if identity in seen:
                duplicates += 1
                continue
            seen.add(identity)
            documents.append(Document(id=identity, text=document_text, source=source))
    if not documents:
        what = (
            "is not UTF-8 text or holds no text"
            if root.is_file()
            else f"holds no non-empty {'/'.join(DOCUMENT_SUFFIXES)} files"
        )
        raise DataError(
            f"{root} {what}" + (f" ({skipped_files(skipped)})" if skipped else ""),
            "point --data at UTF-8 text",
        )
    return Documents(
        documents=tuple(documents),
        files=len(files),
        skipped=tuple(skipped),
        duplicates=duplicates,
    )
