"""Source code as text that every machine with Python has: the standard library's .py files.

The code side of the simulation's code-versus-prose federations (the paper's code/Wikipedia
setting, without a download). Files are cut into documents of about the size of a BBC article
(CODE_DOCUMENT_CHARS), at the start of a top-level statement where one comes, so that one huge
module does not become one client's whole data. Tests, IDLE, lib2to3's grammar, the encodings'
character tables and pydoc's topic strings are left out: they are data or tests, not the code
people write. The text depends on the Python version (say so where results are reported).
"""

from __future__ import annotations

import platform
import sysconfig
from pathlib import Path

from edgefed.documents import Document, document_id
from edgefed.errors import InputFileError

CODE_DOCUMENT_CHARS = 1_500  # cut after this many: pieces average about 2,600 characters
MIN_CODE_DOCUMENT_CHARS = 400
_SKIPPED_PARTS = {
    "test", "tests", "idlelib", "lib2to3", "turtledemo", "encodings", "pydoc_data",
    "site-packages", "dist-packages", "ensurepip", "__pycache__", "__phello__",
}  # fmt: skip


def stdlib_folder() -> Path:
    folder = Path(sysconfig.get_paths()["stdlib"])
    if not (folder / "os.py").is_file():
        raise InputFileError(
            f"the Python standard library's sources are not in {folder}",
            "use a Python installed with its .py files (not a zip-only build)",
        )
    return folder


def code_source_name() -> str:
    """'Python 3.11.7 standard library': what the code documents are, for reports."""
    return f"Python {platform.python_version()} standard library"


def code_chunks(text: str, target: int = CODE_DOCUMENT_CHARS) -> list[str]:
    """`text` cut after `target` characters at the next top-level statement (a line at column
    0 that is not blank, a comment or a closing bracket), at the next blank line once 2 x
    target is passed, at any line past 4 x target; pieces shorter than MIN_CODE_DOCUMENT_CHARS
    are dropped."""
    chunks, lines, size = [], [], 0
    for line in text.splitlines(keepends=True):
        top_level = line[:1] not in ("", " ", "\t", "\n", "#", ")", "]", "}")
        blank = not line.strip()
        if lines and (
            (size >= target and top_level)
            or (size >= 2 * target and blank)
            or size >= 4 * target  # one long statement (a table): any line
        ):
            chunks.append("".join(lines))
            lines, size = [], 0
        lines.append(line)
        size += len(line)
    if lines:
        chunks.append("".join(lines))
    return [c.strip("\n") for c in chunks if len(c.strip()) >= MIN_CODE_DOCUMENT_CHARS]


def code_documents() -> list[Document]:
    """Every document of the standard library's code, in path order."""
    root = stdlib_folder()
    documents, seen = [], set()
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if _SKIPPED_PARTS & set(relative.parts) or relative.name.startswith("test_"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for index, chunk in enumerate(code_chunks(text), start=1):
            identity = document_id(chunk)
            if identity not in seen:  # a licence header or a stub repeated across files
                seen.add(identity)
                documents.append(Document(identity, chunk, f"{relative}#{index}"))
    if not documents:
        raise InputFileError(f"no Python source found under {root}", "reinstall Python")
    return documents
