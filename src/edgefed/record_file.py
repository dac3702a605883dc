"""The versioned JSON documents edgefed writes into workspaces and run folders.

Each document (a training run's metrics, a round's trust row, evaluation and record, a
device's config) is a frozen dataclass that subclasses `RecordFile`: its file name and format
version sit next to its fields, `read` checks the version before it trusts a key (a clear
error for a newer or unknown one) and `write` is atomic. Nothing else in edgefed reads these
files by raw key.

Documents written before versions were added (trust.json, evaluation.json, round.json of
format 1 carried none) are read as format 1: their keys are the same.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Self

from edgefed.atomic import atomic_write_text
from edgefed.errors import InputFileError, ModelFormatError


def read_json_file(
    path: Path, what: str, fix: str = "delete it and run the step that writes it again"
) -> Any:
    """A JSON file's value; InputFileError when missing, ModelFormatError (with `fix`) when
    damaged."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InputFileError(f"{what} {path} is missing", "run the step that writes it") from exc
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"{what} {path} is damaged ({exc})", fix) from exc


def write_json_file(path: Path, document: Any) -> None:
    atomic_write_text(path, json.dumps(document, indent=1) + "\n")


@dataclasses.dataclass(frozen=True)
class RecordFile:
    """Base of the versioned documents; subclasses set FILE, FORMAT and KIND."""

    FILE: ClassVar[str]
    FORMAT: ClassVar[int] = 1
    KIND: ClassVar[str]
    UNVERSIONED_IS: ClassVar[int | None] = None  # the format a file without "format" has
    FIX: ClassVar[str] = "delete it and run the step that writes it again"  # when damaged

    @classmethod
    def from_dict(cls, data: dict) -> Self:
        """The fields by name (those with a default may be absent); subclasses convert nested
        values."""
        return cls(
            **{
                f.name: data[f.name]
                for f in dataclasses.fields(cls)
                if f.name in data
                or (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
            }
        )

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> Self:
        """The document at `path`, or InputFileError / ModelFormatError saying what is wrong."""
        path = Path(path)
        data = read_json_file(path, cls.KIND, cls.FIX)
        if not isinstance(data, dict):
            raise ModelFormatError(f"{cls.KIND} {path} is not a JSON object", cls.FIX)
        version = data.get("format", cls.UNVERSIONED_IS)
        if version != cls.FORMAT:
            newer = isinstance(version, int) and version > cls.FORMAT
            raise ModelFormatError(
                f"{cls.KIND} {path} is format {version}; this edgefed reads format {cls.FORMAT}",
                "upgrade edgefed" if newer else cls.FIX,
            )
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ModelFormatError(f"{cls.KIND} {path} lacks or garbles {exc}", cls.FIX) from exc

    def write(self, path: str | os.PathLike[str]) -> None:
        write_json_file(Path(path), {"format": self.FORMAT} | self.as_dict())
