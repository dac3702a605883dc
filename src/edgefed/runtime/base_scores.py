"""The bare base's perplexity of a text, computed once and remembered across processes.

A device scores its base on the same trust-validation text (training's report) and the same
test text (the round's evaluation) every round, each time in a new process. The answer depends
only on the runtime file, the window, the micro-batch, the stride, the tokens and the
llama.cpp build, so it is
kept in $EDGEFED_HOME/cache/scores/<runtime file sha256>.json and read back instead of
recomputed. The file is a cache: a damaged one is ignored and rewritten, and deleting it is
always safe.
"""

from __future__ import annotations

import json
import logging

from edgefed.atomic import atomic_write_text
from edgefed.home import cache_dir
from edgefed.scoring import PerplexityResult

logger = logging.getLogger(__name__)

# entries kept per runtime file; the oldest go first (a device uses a handful of texts)
MAX_ENTRIES = 256


def _build() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return "unknown"


class BaseScoreCache:
    """Remembered base perplexities of one runtime file at one window and micro-batch size.

    The file's sha256 is asked of `info` only when a base score is first looked up: hashing a
    base of gigabytes costs seconds that a runtime which never scores its base must not pay.
    """

    def __init__(self, info, window: int, ubatch: int) -> None:
        self._info = info
        self._prefix = f"{_build()}:{window}:{ubatch}"
        self._path = None
        self._entries: dict[str, dict] | None = None

    def _key(self, digest: str, stride: int) -> str:
        return f"{self._prefix}:{stride}:{digest}"

    def _load(self) -> dict[str, dict]:
        if self._entries is None:
            self._path = cache_dir("scores") / f"{self._info.fingerprint}.json"
            try:
                entries = json.loads(self._path.read_text(encoding="utf-8"))
                self._entries = entries if isinstance(entries, dict) else {}
            except FileNotFoundError:
                self._entries = {}
            except (OSError, ValueError) as exc:
                logger.debug("ignoring the unreadable score cache %s (%s)", self._path, exc)
                self._entries = {}
        return self._entries

    def get(self, digest: str, stride: int) -> PerplexityResult | None:
        entry = self._load().get(self._key(digest, stride))
        try:
            return PerplexityResult(**entry) if entry is not None else None
        except TypeError:  # written by another edgefed version
            return None

    def put(self, digest: str, stride: int, result: PerplexityResult) -> None:
        entries = self._load()
        entries[self._key(digest, stride)] = result.summary()
        while len(entries) > MAX_ENTRIES:
            entries.pop(next(iter(entries)))
        try:
            atomic_write_text(self._path, json.dumps(entries))
        except OSError as exc:  # a cache that cannot be written only costs time
            logger.debug("could not write the score cache %s (%s)", self._path, exc)
